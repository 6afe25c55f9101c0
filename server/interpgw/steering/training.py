"""Steering vectors from contrastive activations (CAA mean difference; RepE / repeng PCA of differences).

Pure torch: the service traces the pairs through the engine and hands the activations here.
"""

from __future__ import annotations

from enum import StrEnum

import torch


def without_sink(acts: torch.Tensor) -> torch.Tensor:
    """A prompt's token activations `[n_tokens, d_model]` without its first token (unless it is the only one).

    The first token is an attention sink in most LMs, with activations orders of magnitude larger than the rest
    (SmolLM2: ~2e4 against ~10 in one channel, from layer ~10 on). Averaged in, it dominates the mean; a
    steering vector trained that way mostly moves that channel and wrecks generation (measured: gibberish at
    layers 12 and 16 of SmolLM2, see docs/steering.md). Token means for training and mean ablation use this.
    """
    return acts[1:] if acts.shape[0] > 1 else acts


def mean_over_tokens(acts: torch.Tensor) -> torch.Tensor:
    """Mean of a prompt's token activations `[n_tokens, d_model]` -> `[d_model]`, its first token left out."""
    return without_sink(acts).mean(dim=0)


class TrainMethod(StrEnum):
    MEAN_DIFF = "mean_diff"
    PCA = "pca"


def contrast_vector(
    positive: torch.Tensor,  # [n_pairs, d_model]
    negative: torch.Tensor,  # [n_pairs, d_model]
    method: TrainMethod,
) -> tuple[torch.Tensor, float]:
    """The steering direction `[d_model]` and its separation on the pairs.

    mean_diff: the mean of (positive - negative), as in CAA; scale 1 adds the average contrast.
    pca: the first principal direction of the differences (uncentred, so it is the direction carrying most of
    their energy), signed so positives project higher, and sized to the mean projection of the differences
    so that scale 1 means the same thing as for mean_diff.
    Separation: the share of pairs whose positive projects higher than its negative on the direction.
    """
    diffs = positive.double() - negative.double()  # [n_pairs, d_model]
    if method is TrainMethod.MEAN_DIFF:
        vector = diffs.mean(dim=0)
    elif method is TrainMethod.PCA:
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        direction = vh[0]  # [d_model], unit norm
        projections = diffs @ direction  # [n_pairs]
        if projections.mean() < 0:
            direction, projections = -direction, -projections
        vector = direction * projections.mean()
    else:
        raise ValueError(f"unknown method {method}")
    norm = vector.norm()
    separation = float(((diffs @ vector) > 0).double().mean()) if norm > 0 else 0.0
    return vector.float(), separation
