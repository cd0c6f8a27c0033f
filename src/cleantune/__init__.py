"""cleantune: remove backdoors from language models with parameter-efficient fine-tuning."""

__version__ = "0.1.0"
