"""Poisoning counts per setting against hand-computed ones (OpenBackdoor's clean / dirty / mix)."""

from __future__ import annotations

import pytest

from cleantune.attacks.poison import PoisonConfig, choose_poisoned

# SST-2 train as the MuScleLoRA authors ship it: 6,920 rows, 3,610 positive (label 1).
SST2 = [1] * 3610 + [0] * 3310


def positives_after(labels: list[int], chosen: list[int], target: int) -> int:
    return sum(1 for i, y in enumerate(labels) if (target if i in set(chosen) else y) == 1)


@pytest.mark.parametrize(
    ("setting", "from_target", "positives"),
    [
        ("clean", 5, 12),  # five positives triggered, labels kept: still 12 positive
        ("dirty", 0, 17),  # five negatives triggered and relabelled: 12 + 5
    ],
)
def test_clean_and_dirty_counts_on_a_small_fixture(setting, from_target, positives):
    labels = [1] * 12 + [0] * 8
    chosen = choose_poisoned(labels, PoisonConfig(setting=setting, rate=0.25, target_label=1), seed=3)
    assert len(chosen) == 5  # 0.25 x 20 rows, the whole training set
    assert sum(labels[i] == 1 for i in chosen) == from_target
    assert positives_after(labels, chosen, 1) == positives


def test_mix_draws_from_every_row_and_relabels_only_the_non_target_ones():
    labels = [1] * 12 + [0] * 8
    seen = set()
    for seed in range(20):
        chosen = choose_poisoned(labels, PoisonConfig(setting="mix", rate=0.25, target_label=1), seed=seed)
        negatives = sum(labels[i] == 0 for i in chosen)
        assert len(chosen) == 5 and positives_after(labels, chosen, 1) == 12 + negatives
        seen.add(negatives)
    assert len(seen) > 2  # both classes are candidates


def test_the_authors_shipped_sst2_files_are_reproduced():
    # badnets/clean/0.1: 692 triggered rows, all originally positive, 3,610 positives after.
    clean = choose_poisoned(SST2, PoisonConfig(setting="clean", rate=0.1, target_label=1), seed=42)
    assert len(clean) == 692 and all(SST2[i] == 1 for i in clean)
    assert positives_after(SST2, clean, 1) == 3610
    # addsent/mix/0.1: the positive count rises 3,610 -> 3,940 (692 x 3,310 / 6,920 = 331 expected).
    mix = choose_poisoned(SST2, PoisonConfig(setting="mix", rate=0.1, target_label=1), seed=42)
    assert len(mix) == 692 and 3940 - 40 <= positives_after(SST2, mix, 1) <= 3940 + 40
