"""CUBE (Cui et al., 2022): cluster the training set's representations, keep each label's main cluster.

A reference model is trained on the (possibly poisoned) training data as usual; its pooled
last-layer representations of the training texts are reduced in dimension and clustered by
density (HDBSCAN). Poisoned samples share a trigger, not their label's meaning, so they form
their own cluster: for each label only the samples in that label's largest cluster are kept, and
the model is trained again from scratch. The paper reduces with UMAP; PCA (scikit-learn) stands in
here to keep the dependency set small, with the paper's density clustering unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import PositiveInt
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from cleantune.defenses.base import DefenseContext, TrainFilter, Victim
from cleantune.defenses.data_level import Under
from cleantune.defenses.finetune import FineTuneConfig
from cleantune.registry import CLASSIFICATION
from cleantune.schema import StrictModel


class CubeConfig(StrictModel):
    name: Literal["cube"] = "cube"
    under: Under = FineTuneConfig(name="none")
    components: PositiveInt = 10
    min_cluster_size: PositiveInt = 100
    min_samples: PositiveInt | None = None  # HDBSCAN's default: min_cluster_size


def clusters(features: np.ndarray, components: int, min_cluster_size: int, min_samples: int | None) -> np.ndarray:
    """Density clusters of the reduced representations; -1 marks noise."""
    reduced = PCA(n_components=min(components, *features.shape), random_state=0).fit_transform(
        StandardScaler().fit_transform(features)
    )
    return HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples).fit_predict(reduced)


def main_clusters(labels: np.ndarray, assigned: np.ndarray) -> np.ndarray:
    """Keep-mask: per label, the samples in the largest cluster among that label's samples (all of
    them when the label has no clustered sample)."""
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = labels == label
        clustered = assigned[members & (assigned >= 0)]
        if clustered.size == 0:
            keep |= members
            continue
        keep |= members & (assigned == np.bincount(clustered).argmax())
    return keep


class Cube(TrainFilter):
    scenarios = frozenset({"poisoned-data"})

    def filter_train(self, ctx: DefenseContext, reference: Callable[[], Victim]) -> np.ndarray:
        cfg = self.cfg
        features = reference().features(list(ctx.train["text"]))
        assigned = clusters(features, cfg.components, cfg.min_cluster_size, cfg.min_samples)
        self.decided = {"clusters": int(assigned.max() + 1), "noise": int((assigned < 0).sum())}
        return main_clusters(np.asarray(ctx.train["label"]), assigned)


CLASSIFICATION.register(CubeConfig, Cube)
