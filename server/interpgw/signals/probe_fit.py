"""Linear truthfulness probes (SAPLMA / "geometry of truth" style), fitted in pure torch.

No scikit-learn: the gateway already depends on torch, and a logistic regression on a few thousand
activation rows is a handful of LBFGS steps. Probes are fitted on standardised features (so the L2 penalty
treats every residual-stream direction alike and LBFGS is well conditioned) and folded back into a weight and
bias that apply to raw activations, which is what a monitor sees at serving time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ProbeFit", "auroc", "fit_logistic_probe", "quantile_of", "stratified_split", "train_probe"]

_STD_FLOOR = 1e-6
_N_QUANTILES = 101


def _as_float64(values: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).reshape(-1)  # [n]
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def _as_bool(labels: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(labels).detach().to(device="cpu").reshape(-1).bool()  # [n]


def auroc(scores: Sequence[float] | torch.Tensor, labels: Sequence[bool] | torch.Tensor) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties get average ranks, i.e. count 1/2).

    Rank-based so it is exact, O(n log n), and needs no threshold sweep.
    """
    s = _as_float64(scores, "scores")  # [n]
    y = _as_bool(labels)  # [n]
    if s.numel() != y.numel():
        raise ValueError(f"scores and labels differ in length: {s.numel()} != {y.numel()}")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs both classes present (positives and negatives)")
    uniq, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)  # [u], [n], [u]
    counts = counts.to(torch.float64)
    # 1-based average rank of each distinct value: last rank of its block minus half the block's extra width.
    avg_rank = torch.cumsum(counts, 0) - (counts - 1.0) / 2.0  # [u]
    rank_sum_pos = float(avg_rank[inverse][y].sum())
    u_stat = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return u_stat / (n_pos * n_neg)


def stratified_split(labels: Sequence[bool], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, test), each class separately, so both sides see both classes.

    Deterministic for a given seed (its own torch.Generator, leaving the global RNG alone). Each class puts
    round(test_fraction * n_class) examples in test, clamped so each side gets at least one.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = [bool(v) for v in labels]
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for cls in (False, True):
        idx = [i for i, v in enumerate(y) if v is cls]
        if len(idx) < 2:
            raise ValueError(
                f"stratified_split needs at least 2 examples of each class (one for train, one for test); "
                f"class {cls} has {len(idx)}"
            )
        n_test = min(max(round(test_fraction * len(idx)), 1), len(idx) - 1)
        perm = torch.randperm(len(idx), generator=gen).tolist()
        shuffled = [idx[p] for p in perm]
        test.extend(shuffled[:n_test])
        train.extend(shuffled[n_test:])
    return sorted(train), sorted(test)


class _StandardisedFit(NamedTuple):
    """A probe in standardised coordinates: score = sigmoid(((x - mean) / std) @ weight + bias)."""

    weight: torch.Tensor  # [d] float64
    bias: float
    mean: torch.Tensor  # [d] float64
    std: torch.Tensor  # [d] float64


def _check_features_labels(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if features.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    y = _as_bool(labels)  # [n]
    if y.numel() != features.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but labels has {y.numel()}")
    x = features.detach().to(device="cpu", dtype=torch.float64)  # [n, d]
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features must be finite")
    return x, y


def _fit_standardised(features: torch.Tensor, labels: torch.Tensor, l2: float, max_iter: int) -> _StandardisedFit:
    """Fit the logistic regression in standardised float64 coordinates (see fit_logistic_probe)."""
    x, y = _check_features_labels(features, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise ValueError("fit_logistic_probe needs both classes present in the training rows")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    mean = x.mean(dim=0)  # [d]
    std = x.std(dim=0, unbiased=False).clamp_min(_STD_FLOOR)  # [d]
    xs = (x - mean) / std  # [n, d]
    target = y.to(torch.float64)  # [n]

    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)  # [d]
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xs @ w + b  # [n]
        loss = F.binary_cross_entropy_with_logits(logits, target) + l2 * (w @ w) / 2.0
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return _StandardisedFit(w.detach(), float(b.detach()), mean, std)


def fit_logistic_probe(
    features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, max_iter: int = 200
) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression; returns (weight [d] float32, bias) for RAW features.

    Loss = mean BCE + l2 * ||w_std||^2 / 2 on standardised features (train mean/std, std floored at 1e-6),
    bias unpenalised, minimised by LBFGS (strong Wolfe) in float64. Folding: w = w_std / std,
    b = b_std - mean . w, so score = sigmoid(features @ weight + bias) with no standardisation at serving time.
    """
    fit = _fit_standardised(features, labels, l2, max_iter)
    weight = fit.weight / fit.std  # [d]
    bias = fit.bias - float(fit.mean @ weight)
    return weight.to(torch.float32), bias


@dataclass
class ProbeFit:
    """A fitted probe with its held-out quality and score quantiles (to calibrate live scores)."""

    weight: torch.Tensor  # [d] float32, applies to raw features
    bias: float
    train_auroc: float
    test_auroc: float
    n_train: int
    n_test: int
    quantiles: tuple[float, ...]  # 101 quantiles (q = 0.00 .. 1.00) of sigmoid scores over all examples
    test_accuracy: float  # at threshold 0.5


def _probe_scores(features: torch.Tensor, weight: torch.Tensor, bias: float) -> torch.Tensor:
    return torch.sigmoid(features @ weight.to(torch.float64) + bias)  # [n] float64


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-2,
) -> ProbeFit:
    """Stratified split, fit on train, report train/test AUROC, test accuracy and score quantiles."""
    x, y = _check_features_labels(features, labels)  # [n, d] float64, [n] bool
    train_idx, test_idx = stratified_split(y.tolist(), test_fraction, seed)
    tr = torch.tensor(train_idx, dtype=torch.long)
    te = torch.tensor(test_idx, dtype=torch.long)
    weight, bias = fit_logistic_probe(x[tr], y[tr], l2=l2)
    scores = _probe_scores(x, weight, bias)  # [n]
    predicted = scores[te] >= 0.5  # [n_test]
    knots = torch.linspace(0.0, 1.0, _N_QUANTILES, dtype=torch.float64)  # [101]
    quantiles = torch.quantile(scores, knots)  # [101]
    return ProbeFit(
        weight=weight,
        bias=bias,
        train_auroc=auroc(scores[tr], y[tr]),
        test_auroc=auroc(scores[te], y[te]),
        n_train=len(train_idx),
        n_test=len(test_idx),
        quantiles=tuple(float(q) for q in quantiles),
        test_accuracy=float((predicted == y[te]).to(torch.float64).mean()),
    )


def quantile_of(score: float, quantiles: Sequence[float]) -> float:
    """Empirical CDF position in [0, 1] of a score among stored, evenly spaced quantile knots.

    Linear interpolation between knots; 0 below the first knot, 1 above the last. A score equal to a run of
    tied knots maps to the middle of the run, so the result stays monotone in the score.
    """
    q = [float(v) for v in quantiles]
    if len(q) < 2:
        raise ValueError(f"quantile_of needs at least 2 quantile knots, got {len(q)}")
    if any(not math.isfinite(v) for v in q) or any(a > b for a, b in zip(q, q[1:], strict=False)):
        raise ValueError("quantiles must be finite and non-decreasing")
    s = float(score)
    if math.isnan(s):
        raise ValueError("score must not be NaN")
    last = len(q) - 1
    lo = bisect.bisect_left(q, s)
    hi = bisect.bisect_right(q, s)
    if hi == 0:
        return 0.0
    if lo > last:
        return 1.0
    if lo < hi:  # s equals knots lo .. hi-1
        return (lo + hi - 1) / 2.0 / last
    frac = (s - q[lo - 1]) / (q[lo] - q[lo - 1])
    return (lo - 1 + frac) / last
