"""Linear probe training: AUROC, stratified split, logistic fit and its folding, calibration quantiles."""

from __future__ import annotations

import math

import pytest
import torch

from interpgw.signals.probe_fit import (
    ProbeFit,
    _fit_standardised,
    auroc,
    fit_logistic_probe,
    quantile_of,
    stratified_split,
    train_probe,
)


def _pairwise_auroc(scores: list[float], labels: list[bool]) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), by brute force over all pairs."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _gaussian_dataset(n: int, d: int, seed: int, separation: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes offset along a random direction, with a non-zero mean and uneven feature scales."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=gen) < 0.5  # [n]
    direction = torch.randn(d, generator=gen)
    direction = direction / direction.norm()  # [d]
    scales = torch.rand(d, generator=gen) * 3.0 + 0.2  # [d]
    x = torch.randn(n, d, generator=gen)  # [n, d]
    x = x + separation * (labels.float()[:, None] - 0.5) * direction[None, :]
    return (x * scales + 1.5).to(torch.float32), labels


def test_auroc_matches_pairwise_count_with_ties() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        scores = torch.randint(0, 7, (80,), generator=gen).to(torch.float32)  # many ties
        labels = torch.rand(80, generator=gen) < 0.4
        expected = _pairwise_auroc(scores.tolist(), labels.tolist())
        assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
        assert auroc(scores.tolist(), labels.tolist()) == pytest.approx(expected, abs=1e-12)


def test_auroc_perfect_reversed_and_all_tied() -> None:
    labels = [False, False, False, True, True]
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    assert auroc([0.5] * 5, labels) == 0.5


def test_auroc_errors() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="length"):
        auroc([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="finite"):
        auroc([0.1, float("nan")], [True, False])


def test_stratified_split_deterministic_and_stratified() -> None:
    labels = [i % 3 == 0 for i in range(60)]  # 20 positives, 40 negatives
    train, test = stratified_split(labels, 0.25, seed=7)
    assert (train, test) == stratified_split(labels, 0.25, seed=7)
    assert (train, test) != stratified_split(labels, 0.25, seed=8)
    assert sorted(train + test) == list(range(60))
    assert not set(train) & set(test)
    assert sum(labels[i] for i in test) == 5
    assert sum(not labels[i] for i in test) == 10


def test_stratified_split_each_side_gets_each_class() -> None:
    labels = [True, True, False, False, False, False, False, False, False, False]
    for fraction in (0.01, 0.5, 0.99):
        train, test = stratified_split(labels, fraction, seed=0)
        for side in (train, test):
            assert any(labels[i] for i in side)
            assert any(not labels[i] for i in side)


def test_stratified_split_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 examples of each class"):
        stratified_split([True, False, False, False], 0.5, seed=0)
    with pytest.raises(ValueError, match="at least 2 examples of each class"):
        stratified_split([False, False, False], 0.5, seed=0)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split([True, True, False, False], 1.0, seed=0)


def test_separable_gaussians_probe_generalises_and_folds_exactly() -> None:
    features, labels = _gaussian_dataset(n=400, d=64, seed=0, separation=4.0)
    fit = train_probe(features, labels, test_fraction=0.25, seed=0)
    assert isinstance(fit, ProbeFit)
    assert fit.test_auroc > 0.9
    assert fit.train_auroc >= fit.test_auroc - 0.05
    assert fit.test_accuracy > 0.8
    assert (fit.n_train, fit.n_test) == (300, 100)
    assert fit.weight.shape == (64,) and fit.weight.dtype == torch.float32

    # Folded raw-feature weights must score exactly like standardise-then-apply.
    std_fit = _fit_standardised(features, labels, l2=1e-2, max_iter=200)
    standardised = (features.double() - std_fit.mean) / std_fit.std  # [n, d]
    expected = torch.sigmoid(standardised @ std_fit.weight + std_fit.bias)  # [n]
    weight, bias = fit_logistic_probe(features, labels)
    got = torch.sigmoid(features @ weight + bias)  # [n] float32 on raw features
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_logistic_fit_reaches_stationary_point() -> None:
    features, labels = _gaussian_dataset(n=200, d=16, seed=3, separation=1.0)
    l2 = 0.1
    fit = _fit_standardised(features, labels, l2=l2, max_iter=200)
    xs = ((features.double() - fit.mean) / fit.std).requires_grad_(False)
    w = fit.weight.clone().requires_grad_(True)
    b = torch.tensor(fit.bias, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, labels.double()) + l2 * (w @ w) / 2
    loss.backward()
    assert w.grad is not None and b.grad is not None
    assert float(w.grad.abs().max()) < 1e-6
    assert abs(float(b.grad)) < 1e-6


def test_random_labels_give_chance_auroc() -> None:
    features, _ = _gaussian_dataset(n=400, d=64, seed=5, separation=0.0)
    labels = torch.rand(400, generator=torch.Generator().manual_seed(11)) < 0.5
    fit = train_probe(features, labels, seed=0)
    assert abs(fit.test_auroc - 0.5) < 0.15


def test_quantiles_calibration() -> None:
    features, labels = _gaussian_dataset(n=200, d=8, seed=2, separation=2.0)
    fit = train_probe(features, labels, seed=1)
    q = fit.quantiles
    assert len(q) == 101
    assert all(a <= b for a, b in zip(q, q[1:], strict=False))
    scores = torch.sigmoid(features.double() @ fit.weight.double() + fit.bias)
    assert q[0] == pytest.approx(float(scores.min()))
    assert q[-1] == pytest.approx(float(scores.max()))
    assert q[50] == pytest.approx(float(scores.median()), abs=0.02)
    # Score positions spread across [0, 1]: the median score sits near the middle.
    assert quantile_of(float(scores.median()), q) == pytest.approx(0.5, abs=0.02)


def test_quantile_of_monotone_and_bounded() -> None:
    knots = [0.0, 0.1, 0.1, 0.1, 0.4, 0.9, 1.0]
    probes = [x / 200 - 0.5 for x in range(401)]  # -0.5 .. 1.5
    positions = [quantile_of(s, knots) for s in probes]
    assert all(0.0 <= p <= 1.0 for p in positions)
    assert all(a <= b for a, b in zip(positions, positions[1:], strict=False))
    assert quantile_of(-1.0, knots) == 0.0
    assert quantile_of(2.0, knots) == 1.0
    assert quantile_of(0.0, knots) == 0.0
    assert quantile_of(1.0, knots) == 1.0
    assert quantile_of(0.1, knots) == pytest.approx(2 / 6)  # middle of the tied run at knots 1..3
    assert quantile_of(0.25, knots) == pytest.approx(3.5 / 6)  # halfway between knots 3 and 4
    uniform = [i / 100 for i in range(101)]
    for s in (0.0, 0.123, 0.5, 0.999):
        assert quantile_of(s, uniform) == pytest.approx(s)


def test_quantile_of_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        quantile_of(0.5, [0.5])
    with pytest.raises(ValueError, match="non-decreasing"):
        quantile_of(0.5, [0.6, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        quantile_of(math.nan, [0.0, 1.0])


def test_fit_errors() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_probe(x, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        fit_logistic_probe(x, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        fit_logistic_probe(torch.randn(10), torch.ones(10, dtype=torch.bool))
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        fit_logistic_probe(bad, torch.arange(10) % 2 == 0)
    with pytest.raises(ValueError, match="at least 2 examples of each class"):
        train_probe(x, torch.tensor([True] + [False] * 9))


def test_constant_feature_does_not_blow_up() -> None:
    features, labels = _gaussian_dataset(n=120, d=6, seed=4, separation=3.0)
    features[:, 2] = 7.0  # zero variance: std floored, weight stays finite
    weight, bias = fit_logistic_probe(features, labels)
    assert bool(torch.isfinite(weight).all()) and math.isfinite(bias)
    scores = torch.sigmoid(features @ weight + bias)
    assert auroc(scores, labels) > 0.9
