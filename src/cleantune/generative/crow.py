"""CROW (Min et al., 2024): internal-consistency regularisation with adversarially perturbed embeddings.

A fresh LoRA trains on the merged suspicious model with the LM loss plus α times the consistency
loss of the hidden states under an FGSM perturbation of the input embeddings. Backdoor triggers
show as abrupt changes between consecutive layers; smoothing them on clean data removes the
shortcut. Settings as the authors': ε 0.1, α 5.5, 100 clean examples.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from peft import PeftModel
from pydantic import Field
from torch import nn

from cleantune.defenses.base import Scenario
from cleantune.generative.base import LLMContext, LLMDefense
from cleantune.generative.sft import LLM_LORA, LLMLora, add_lora
from cleantune.registry import GENERATION
from cleantune.schema import StrictModel


class CROWConfig(StrictModel):
    name: Literal["crow"] = "crow"
    epsilon: float = Field(0.1, ge=0)  # FGSM step on the input embeddings
    alpha: float = Field(5.5, ge=0)  # weight of the consistency loss
    lora: LLMLora = LLM_LORA


def consistency_loss(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive layer outputs and real tokens of 1 − cos(h_l, h_{l+1})."""
    layers = torch.stack(hidden_states[1:])  # the embedding output is not a layer's
    cos = nn.functional.cosine_similarity(layers[:-1], layers[1:], dim=-1)  # (L-1, batch, tokens)
    weight = mask.unsqueeze(0).to(cos.dtype)
    return ((1 - cos) * weight).sum() / (weight.sum() * cos.shape[0]).clamp(min=1)


class CROW(LLMDefense):
    scenarios: ClassVar[frozenset[Scenario]] = frozenset({"poisoned-llm"})
    trains = True

    def prepare(self, model: nn.Module, ctx: LLMContext) -> nn.Module:
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        return add_lora(model, self.cfg.lora)

    def _consistency(self, model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        return consistency_loss(out.hidden_states, mask)

    def extra_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        mask = inputs["attention_mask"]
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self._consistency(model, embeds, mask), embeds)
        perturbed = (embeds + self.cfg.epsilon * grad.sign()).detach()
        return {"consistency": self.cfg.alpha * self._consistency(model, perturbed, mask)}

    def finalize(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


GENERATION.register(CROWConfig, CROW)
