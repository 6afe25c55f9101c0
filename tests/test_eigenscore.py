"""EigenScore (INSIDE): closed-form cases, ordering, permutation invariance, and a numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interpgw.signals.eigenscore import eigenscore


def _numpy_eigenscore(embeddings: np.ndarray, alpha: float) -> float:
    """The paper's formula spelled out with an explicit J_d matrix."""
    z = embeddings.astype(np.float64).T  # [d, K]
    d, k = z.shape
    j_d = np.eye(d) - np.ones((d, d)) / d
    sigma = z.T @ j_d @ z  # [K, K]
    eig = np.clip(np.linalg.eigvalsh((sigma + sigma.T) / 2), 0.0, None)
    return float(np.mean(np.log(eig + alpha)))


def test_identical_embeddings_closed_form() -> None:
    k, d, alpha = 5, 32, 1e-3
    v = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    emb = v.expand(k, d).clone()  # [K, d]
    # Sigma = ||c||^2 11^T with c = v - mean(v): one eigenvalue K||c||^2, the other K-1 are 0.
    c_norm2 = float(((v - v.mean()) ** 2).sum())
    expected = (math.log(k * c_norm2 + alpha) + (k - 1) * math.log(alpha)) / k
    assert eigenscore(emb, alpha=alpha) == pytest.approx(expected, abs=1e-9)


def test_diverse_scores_higher_than_near_identical() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 128, generator=gen)
    near = base + 1e-3 * torch.randn(8, 128, generator=gen)  # [8, 128]
    diverse = torch.randn(8, 128, generator=gen)  # [8, 128]
    assert eigenscore(diverse) > eigenscore(near) + 1.0


def test_permutation_invariant() -> None:
    emb = torch.randn(10, 48, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert eigenscore(emb[perm]) == pytest.approx(eigenscore(emb), abs=1e-9)


def test_matches_numpy_reference() -> None:
    rng = np.random.default_rng(4)
    for k, d in ((2, 5), (6, 40), (12, 10), (20, 256)):
        emb = rng.normal(size=(k, d)) * rng.uniform(0.1, 3.0)
        for alpha in (1e-3, 0.5):
            got = eigenscore(torch.from_numpy(emb), alpha=alpha)
            assert got == pytest.approx(_numpy_eigenscore(emb, alpha), abs=1e-9)


def test_float32_input_accepted() -> None:
    emb = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    assert eigenscore(emb) == pytest.approx(_numpy_eigenscore(emb.numpy(), 1e-3), abs=1e-9)


def test_errors() -> None:
    with pytest.raises(ValueError, match="K=2"):
        eigenscore(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        eigenscore(torch.randn(8))
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        eigenscore(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        eigenscore(bad)
    with pytest.raises(ValueError, match="alpha"):
        eigenscore(torch.randn(3, 8), alpha=0.0)
