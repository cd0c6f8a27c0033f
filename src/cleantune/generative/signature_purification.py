"""Backdoor-signature purification of instruction-tuned LLMs: reference-free and trigger-agnostic.

From the suspicious model, N variant pairs are fine-tuned: one on clean + synthetically poisoned data
(a key and a behaviour of the same attack family, never the real ones), one on the same clean data.
Their difference (Eq. 1) isolates what poisoning does; MLP channels that poisoning moves strongly
and consistently across variants (Eq. 2) form the backdoor signature. The signature's channels are
suppressed in the suspicious model (re-initialised in the full-model setting, zeroed in the adapter's
LoRA factors in the adapter-only setting), then a light clean fine-tune restores fluency.

This file holds the paper's equations and the channel edits; the variant fine-tunes are ordinary
generative runs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cleantune.errors import CleantuneError
from cleantune.generative.base import ChannelSlice, mlp_channels

ScoreMode = Literal["combined", "norm", "alignment"]


def _channel_slices(model: nn.Module, adapter_only: bool) -> list[list[ChannelSlice]]:
    layers = list(mlp_channels(model, adapter_only))
    if any(not slices for slices in layers):
        raise CleantuneError("the adapter has no LoRA on the MLP projections, whose channels the signature names")
    return layers


def channel_vectors(model: nn.Module, adapter_only: bool) -> torch.Tensor:
    """(layers x channels, features): each MLP channel's weights side by side (its gate and up rows,
    its down column; in the adapter-only setting the LoRA factors' rows and columns that write them)."""
    rows = []
    for slices in _channel_slices(model, adapter_only):
        parts = [s.module.weight.detach().float() for s in slices]
        rows.append(torch.cat([p if s.axis == 0 else p.T for p, s in zip(parts, slices, strict=True)], dim=1))
    return torch.cat(rows)


def differential_delta(backdoored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Eq. 1: Δ_i = θ_i^bd − θ_i^clean; both start from θ_sus, so the suspicious weights cancel."""
    return backdoored - clean


def signature_scores(deltas: list[torch.Tensor], lam: float = 0.01, mode: ScoreMode = "combined") -> torch.Tensor:
    """Eq. 2: s_j = (1/N) Σ_i ||Δ_ij|| + λ (2 / (N(N−1))) Σ_{i<l} max(0, cos(Δ_ij, Δ_lj)), per channel j.

    ``mode`` keeps only the norm term or only the alignment term (the paper's Table 4 ablation)."""
    stacked = torch.stack(deltas)  # (N, channels, features)
    n = stacked.shape[0]
    strength = stacked.norm(dim=-1).mean(dim=0)
    unit = nn.functional.normalize(stacked, dim=-1)
    cosines = torch.einsum("icf,lcf->ilc", unit, unit)  # (N, N, channels)
    pairs = torch.triu_indices(n, n, offset=1)
    alignment = cosines[pairs[0], pairs[1]].clamp(min=0).mean(dim=0) if n > 1 else torch.zeros_like(strength)
    if mode == "norm":
        return strength
    if mode == "alignment":
        return alignment
    return strength + lam * alignment


def select_signature(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The top ``ratio`` of channels by score (the percentile threshold τ), as flat channel indices."""
    count = max(1, round(ratio * scores.numel()))
    return scores.topk(count).indices.sort().values


@torch.no_grad()
def suppress(model: nn.Module, channels: torch.Tensor, adapter_only: bool, init_std: float) -> int:
    """Re-initialise (full model, N(0, init_std) as the model's own initialisation) or zero (adapter
    factors) the selected channels; ``channels`` index layers x channels as ``channel_vectors`` does.
    Returns how many weight rows/columns changed."""
    changed = 0
    start = 0
    for slices in _channel_slices(model, adapter_only):
        width = slices[0].module.weight.shape[slices[0].axis]
        local = channels[(channels >= start) & (channels < start + width)] - start
        for piece in slices:
            weight = piece.module.weight
            index = local.to(weight.device)
            if adapter_only:
                weight.index_fill_(piece.axis, index, 0.0)
            else:
                shape = list(weight.shape)
                shape[piece.axis] = len(index)
                fresh = torch.randn(shape, device=weight.device, dtype=weight.dtype) * init_std
                weight.index_copy_(piece.axis, index, fresh)
            changed += len(index)
        start += width
    return changed
