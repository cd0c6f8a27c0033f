"""ONION, STRIP, RAP (test time), BKI and CUBE (training set), on tiny models and planted signals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_tree, tiny_context
from datasets import Dataset

from cleantune.config import validate
from cleantune.defenses.base import Victim
from cleantune.defenses.bki import Bki, BkiConfig
from cleantune.defenses.cube import Cube, CubeConfig
from cleantune.defenses.onion import Onion, OnionConfig
from cleantune.defenses.rap import Rap, RapConfig
from cleantune.defenses.strip import Strip, StripConfig
from cleantune.dispatch import run
from cleantune.errors import CleantuneError
from cleantune.evaluation import REJECTED, classification_metrics
from cleantune.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def victim(tiny_bert):
    torch.manual_seed(0)
    loaded = load_model(tiny_bert, num_labels=2)
    loaded.model.classifier.weight.data.normal_(0, 5.0)  # a random head confident enough to give distinct entropies
    return Victim(loaded.model, loaded.tokenizer, max_length=32, batch_size=16)


class BagOfWords(torch.nn.Module):
    """A classifier on mean word embeddings: every word moves its output, as RAP's detector needs."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(num_labels=2)
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, 2)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        mask = attention_mask.unsqueeze(-1).float()
        mean = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return SimpleNamespace(logits=self.head(mean))


class RareWordLM(torch.nn.Module):
    """A language model that finds every token equally likely except one, which it finds improbable."""

    def __init__(self, vocab_size: int, rare_id: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[rare_id] = -8.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_onion_removes_a_word_the_language_model_finds_improbable(tiny_llama, tiny_bert, data_dir, victim):
    tokenizer = load_tokenizer(tiny_llama)
    onion = Onion(OnionConfig(lm=str(tiny_llama), cache=False))
    onion._lm = (RareWordLM(len(tokenizer), tokenizer.convert_tokens_to_ids("cf")), tokenizer)
    onion.calibrate(victim, tiny_context(victim.tokenizer, data_dir))
    screened = onion.screen(victim, ["the movie cf was good", "a dull plot"])
    assert screened.texts == ["the movie was good", "a dull plot"]
    assert not screened.rejected.any()
    scores = onion.word_suspicion(["the movie cf was good"])[0]
    assert scores.argmax() == 2 and scores[2] > 0


def test_onion_caches_scores_per_text(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANTUNE_CACHE", str(tmp_path))
    tokenizer = load_tokenizer(tiny_llama)
    calls = []

    class Counting(RareWordLM):
        def forward(self, input_ids, attention_mask):
            calls.append(len(input_ids))
            return super().forward(input_ids, attention_mask)

    first = Onion(OnionConfig(lm=str(tiny_llama)))
    first._language_model()
    first._lm = (Counting(len(tokenizer), 3), tokenizer)
    expected = first.word_suspicion(["the plot cf was dull", "a good film"])
    assert calls
    second = Onion(OnionConfig(lm=str(tiny_llama)))
    second._language_model()
    second._lm = (Counting(len(tokenizer), 3), tokenizer)
    calls.clear()
    again = second.word_suspicion(["a good film", "the plot cf was dull"])
    assert not calls, "cached texts were scored again"
    np.testing.assert_allclose(again[1], expected[0])


def test_strip_rejects_its_false_rejection_rate_of_clean_data(victim, data_dir):
    ctx = tiny_context(victim.tokenizer, data_dir)
    strip = Strip(StripConfig(frr=0.2, copies=4))
    strip.calibrate(victim, ctx)
    dev = list(ctx.dev["text"])
    rejected = strip.screen(victim, dev).rejected
    assert rejected.mean() == pytest.approx(0.2, abs=1 / len(dev))
    np.testing.assert_array_equal(strip.screen(victim, dev).rejected, rejected)  # seeded per text
    copies = strip.perturb(dev[0])
    assert len(copies) == 4 and all(copy != dev[0] for copy in copies)


def test_strip_flags_an_input_whose_prediction_ignores_perturbation(data_dir, victim):
    ctx = tiny_context(victim.tokenizer, data_dir)
    strip = Strip(StripConfig(frr=0.05, copies=4))
    strip.calibrate(victim, ctx)

    class Backdoored:
        """Certain of label 1 whenever 'cf' is in the text, otherwise the tiny model's answer."""

        def probs(self, texts):
            out = victim.probs(texts)
            out[["cf" in t.split() for t in texts]] = [0.0, 1.0]
            return out

    assert strip.screen(Backdoored(), ["cf " * 12 + "cf"]).rejected.all()


def test_rap_learns_its_perturbation_and_reproduces_its_false_rejection_rate(victim, data_dir):
    victim = Victim(BagOfWords(len(victim.tokenizer)), victim.tokenizer, max_length=32, batch_size=16)
    ctx = tiny_context(victim.tokenizer, data_dir)
    embeddings = victim.model.get_input_embeddings().weight.detach().clone()
    rap = Rap(RapConfig(protect_label=1, frr=0.2, epochs=20, lr=0.5))
    rap.calibrate(victim, ctx)
    assert rap.info()["dev_drop_in_range_pct"] > 50, "the perturbation did not learn to lower the protected label"
    torch.testing.assert_close(victim.model.get_input_embeddings().weight, embeddings)  # swapped in only to measure
    assert not torch.equal(rap.rows, embeddings[rap.ids])
    protected = [t for t, y in zip(ctx.dev["text"], ctx.dev["label"], strict=True) if y == 1]
    predicted = victim.probs(protected).argmax(axis=1) == 1
    rejected = rap.screen(victim, protected).rejected
    assert not rejected[~predicted].any(), "only inputs predicted as the protected label can be rejected"
    assert rejected[predicted].mean() == pytest.approx(0.2, abs=1 / predicted.sum())


def test_rap_refuses_a_label_the_task_lacks(victim, data_dir):
    with pytest.raises(CleantuneError, match="protect_label 5"):
        Rap(RapConfig(protect_label=5)).calibrate(victim, tiny_context(victim.tokenizer, data_dir))


class PlantedFeatures:
    """Representations that jump along one axis whenever the planted word is present."""

    def __init__(self, word: str) -> None:
        self.word = word

    def features(self, texts: list[str]) -> np.ndarray:
        rng = np.random.default_rng(0)
        marked = np.array([[10.0 * (self.word in t.split())] for t in texts])
        return np.hstack([marked, rng.normal(0, 0.1, (len(texts), 3))])


def test_bki_finds_a_planted_keyword_and_drops_the_samples_holding_it(data_dir, victim):
    ctx = tiny_context(victim.tokenizer, data_dir)
    texts = list(ctx.train["text"])
    planted = set(range(0, len(texts), 6))
    train = {"text": [f"mn {t}" if i in planted else t for i, t in enumerate(texts)]}
    bki = Bki(BkiConfig())
    keep = bki.filter_train(SimpleNamespace(train=train), lambda: PlantedFeatures("mn"))
    assert list(bki.info()["keywords"]) == ["mn"]
    assert set(np.flatnonzero(~keep)) == planted


def test_cube_keeps_each_labels_main_cluster():
    rng = np.random.default_rng(0)
    clean_0, clean_1, planted = rng.normal(0, 0.3, (60, 4)), rng.normal(5, 0.3, (50, 4)), rng.normal(-5, 0.3, (15, 4))
    features = np.vstack([clean_0, clean_1, planted])
    labels = np.array([0] * 60 + [1] * 65)

    class Reference:
        def features(self, texts):
            return features

    cube = Cube(CubeConfig(min_cluster_size=10, components=4))
    ctx = SimpleNamespace(train={"text": [""] * len(labels), "label": labels.tolist()})
    keep = cube.filter_train(ctx, Reference)
    assert keep[:110].all() and not keep[110:].any()


def test_rejected_inputs_count_as_wrong_and_as_failed_attacks():
    clean = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [1, 1, 0, 0]})
    poison = Dataset.from_dict({"text": ["x", "y"], "label": [0, 0]})
    answers = {"a": 1, "b": REJECTED, "c": 0, "d": 0, "x": 1, "y": REJECTED}

    def predict(data):
        predictions = np.array([answers[t] for t in data["text"]])
        return predictions, predictions == REJECTED

    metrics = classification_metrics(predict, clean, poison, target_label=1)
    assert metrics["cacc"] == 75.0 and metrics["asr"] == 50.0
    assert metrics["rejected_test"] == 25.0 and metrics["rejected_test_poison"] == 50.0


def test_a_test_time_defense_run_records_rejections(data_dir, tiny_bert, tmp_path):
    tree = run_tree(data_dir, tiny_bert, tmp_path / "runs", defense={"name": "strip", "copies": 3, "frr": 0.1})
    record = run(validate(tree, "test"))
    metrics = record["metrics"]
    assert 0 <= metrics["rejected_test"] <= 100 and "rejected_test_poison" in metrics
    assert record["defense_info"]["threshold"] is not None


def test_a_filtering_defense_retrains_on_what_it_keeps_and_resumes_its_decision(data_dir, tiny_bert, tmp_path):
    tree = run_tree(
        data_dir, tiny_bert, tmp_path / "runs", defense={"name": "bki", "under": {"name": "lora", "lora": {"r": 2}}}
    )
    cfg = validate(tree, "test")
    first = run(cfg)
    filtering = first["train_filter"]
    assert filtering["removed"] + filtering["kept"] == 120 and first["n_train"] == filtering["kept"]
    assert 0 <= filtering["precision"] <= 100 and filtering["recall"] is not None
    reference = filtering["reference_metrics"]  # the undefended model the filter inspected, scored
    assert 0 <= reference["cacc"] <= 100 and reference["asr"] is not None
    assert (cfg.run_dir / "train_filter.json").exists() and not (cfg.run_dir / "checkpoints").exists()
    again = run(cfg, force=True)
    assert again["train_filter"] == filtering


def test_training_set_filters_declare_the_poisoned_data_scenario_only(data_dir, tiny_bert, tmp_path):
    tree = run_tree(data_dir, tiny_bert, tmp_path / "runs", defense={"name": "cube"}, scenario="poisoned-weights")
    with pytest.raises(CleantuneError, match="does not handle scenario 'poisoned-weights'"):
        run(validate(tree, "test"))


def test_adapters_start_from_the_same_random_state_with_or_without_a_reference_model_and_not_from_the_seed(
    data_dir, tiny_bert, tmp_path, monkeypatch
):
    from cleantune.defenses.peft_baselines import PeftBaseline

    states: list[torch.Tensor] = []
    original = PeftBaseline.prepare

    def spy(self, model, ctx):
        states.append(torch.get_rng_state())
        return original(self, model, ctx)

    monkeypatch.setattr(PeftBaseline, "prepare", spy)
    lora = {"name": "lora", "lora": {"r": 2}}
    run(validate(run_tree(data_dir, tiny_bert, tmp_path / "a", defense=lora), "test"))
    run(validate(run_tree(data_dir, tiny_bert, tmp_path / "b", defense={"name": "bki", "under": lora}), "test"))
    plain, _, filtered = states  # the middle one: BKI's reference model, on a model loaded afresh
    assert torch.equal(plain, filtered)
    # The stream goes on from where loading the model (and initialising its new head) left it:
    # restarting it from the seed would draw the adapter from the numbers that drew the head.
    torch.manual_seed(7)
    assert not torch.equal(plain, torch.get_rng_state())
