"""Unit tests of the steering core without an engine: targets, ops, contrastive training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interpgw.core.errors import InvalidArgument
from interpgw.core.interventions import EditOp, EditOrder, TargetMode, TargetSpec, apply_edit, check_vector
from interpgw.core.positions import RowFilter
from interpgw.steering.training import TrainMethod, contrast_vector, mean_over_tokens


def test_targets_resolve_to_absolute_rows() -> None:
    positions = np.arange(8)  # prompt of 5, then generated 5, 6, 7
    cases = {
        TargetSpec(TargetMode.ALL): list(range(8)),
        TargetSpec(TargetMode.PROMPT): [0, 1, 2, 3, 4],
        TargetSpec(TargetMode.GENERATED): [5, 6, 7],
        TargetSpec(TargetMode.INDICES, indices=(0, -1)): [0, 4],
        TargetSpec(TargetMode.LAST_N, n=2): [3, 4],
        TargetSpec(TargetMode.ALL, window_start=3, window_end=6): [3, 4, 5],
        TargetSpec(TargetMode.GENERATED, window_start=6): [6, 7],
    }
    for spec, expected in cases.items():
        assert np.nonzero(spec.resolve(5).mask(positions))[0].tolist() == expected, spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TargetSpec(TargetMode.INDICES), "at least one index"),
        (TargetSpec(TargetMode.INDICES, indices=(5,)), r"valid indices are \[-5, 4\]"),
        (TargetSpec(TargetMode.LAST_N, n=6), r"n in \[1, 5\]"),
        (TargetSpec(TargetMode.ALL, window_start=4, window_end=4), "window"),
        (TargetSpec(TargetMode.ALL, window_start=-1), "window"),
    ],
)
def test_bad_targets_name_the_valid_range(spec: TargetSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        spec.resolve(5)


def test_ops() -> None:
    x = torch.randn(4, 16)
    v = torch.randn(16)
    u = v / v.norm()
    torch.testing.assert_close(apply_edit(x, EditOp.ADD, v, 2.0), x + 2 * v)
    torch.testing.assert_close(apply_edit(x, EditOp.SET, v, 3.0), (3 * v).expand(4, 16))
    assert torch.equal(apply_edit(x, EditOp.ZERO, None), torch.zeros_like(x))
    torch.testing.assert_close(apply_edit(x, EditOp.SCALE, None, -0.5), -0.5 * x)
    assert float((apply_edit(x, EditOp.PROJECT_OUT, v) @ u).abs().max()) < 1e-5
    torch.testing.assert_close(apply_edit(x, EditOp.CLAMP, v, value=2.5) @ u, torch.full((4,), 2.5))
    kept = apply_edit(x, EditOp.ADD, v, 10.0, norm_preserving=True)
    torch.testing.assert_close(kept.norm(dim=1), x.norm(dim=1))
    with pytest.raises(ValueError, match="resolve it first"):
        apply_edit(x, EditOp.MEAN_ABLATE, v)


def test_edit_orders_round_trip_as_json() -> None:
    order = EditOrder(
        EditOp.CLAMP, "blocks.1.hook_resid_post", RowFilter(5, (1, 2), True, (1, 9)), (0.5, -1.0), 2.0, 3.0, True
    )
    assert EditOrder.from_json(order.to_json()) == order


def test_vectors_are_checked() -> None:
    assert check_vector(torch.ones(1, 8, dtype=torch.float64), 8, "v").shape == (8,)
    with pytest.raises(InvalidArgument, match=r"needs \[8\]"):
        check_vector(torch.ones(7), 8, "v")
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        check_vector(torch.tensor([1.0] * 7 + [float("inf")]), 8, "v")


def test_contrast_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=gen)
    negative = torch.randn(20, 32, generator=gen)
    positive = negative + direction + 0.1 * torch.randn(20, 32, generator=gen)
    mean_diff, sep = contrast_vector(positive, negative, TrainMethod.MEAN_DIFF)
    torch.testing.assert_close(mean_diff, (positive - negative).mean(0))
    assert sep == 1.0
    pca, sep_pca = contrast_vector(positive, negative, TrainMethod.PCA)
    cosine = float(pca @ direction / (pca.norm() * direction.norm()))
    assert cosine > 0.99 and sep_pca == 1.0
    assert abs(float(pca.norm()) - float(direction.norm())) < 0.1 * float(direction.norm())
    flipped, _ = contrast_vector(negative, positive, TrainMethod.PCA)  # sign follows the positives
    assert float(flipped @ direction) < 0


def test_mean_over_tokens_leaves_out_the_attention_sink() -> None:
    acts = torch.tensor([[1000.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(mean_over_tokens(acts), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(mean_over_tokens(acts[:1]), torch.tensor([1000.0, 0.0]))
