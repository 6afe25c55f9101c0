"""EigenScore (INSIDE, Chen et al. 2024): semantic spread of K sampled answers in embedding space.

Consistent answers (low hallucination risk) have near-collinear embeddings, so their K x K covariance has one
large eigenvalue and the rest near zero; diverse answers spread the spectrum and raise the mean log-eigenvalue.
"""

from __future__ import annotations

import torch

__all__ = ["eigenscore"]


def eigenscore(embeddings: torch.Tensor, alpha: float = 1e-3) -> float:
    """EigenScore = (1/K) * sum_i log(lambda_i(Sigma) + alpha), natural log, over K sample embeddings [K, d].

    Follows the paper's formula Sigma = Z^T . J_d . Z with Z = embeddings^T (d x K) and
    J_d = I_d - (1/d) 1 1^T, i.e. each embedding is centred over its own feature dimension (not across
    samples) and Sigma is K x K. Sigma is NOT normalised: the INSIDE reference code (torch.cov on [K, d]) also
    divides by d - 1 and reports log10, so its values differ from these by that scale, and alpha weighs
    relatively less here for large d. Eigenvalues are clamped at 0 (round-off) before adding alpha; float64
    throughout.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [K, d], got shape {tuple(embeddings.shape)}")
    k, d = embeddings.shape
    if k < 2:
        raise ValueError(f"eigenscore needs at least K=2 sample embeddings, got {k}")
    if d < 1:
        raise ValueError("embeddings must have at least one feature")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    z = embeddings.detach().to(device="cpu", dtype=torch.float64).T  # [d, K]
    if not bool(torch.isfinite(z).all()):
        raise ValueError("embeddings must be finite")
    # J_d is symmetric and idempotent, so Z^T J_d Z = (J_d Z)^T (J_d Z): exactly symmetric PSD for eigvalsh.
    zc = z - z.mean(dim=0, keepdim=True)  # [d, K]
    sigma = zc.T @ zc  # [K, K]
    eigvals = torch.linalg.eigvalsh(sigma).clamp_min(0.0)  # [K]
    return float(torch.log(eigvals + alpha).mean())
