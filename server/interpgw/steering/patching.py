"""Activation patching (causal tracing): which (layer, position) states carry the clean run's answer.

For every cell, the corrupted prompt runs with one edit: the hook's state at that layer and position set to
the clean run's value. All cells are independent requests, so they go through the engine's batch together.
The metric is read from the final norm's output at the last position times the checkpoint's unembedding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from interpgw.core.hookpoints import LN_FINAL
from interpgw.core.interventions import EditOp, EditOrder
from interpgw.core.positions import RowFilter

# Runs the prompt once with `edits`, capturing `hooks` at `positions` (None: all): hook -> [n_positions, d_model]
Forward = Callable[[list[int], tuple[EditOrder, ...], tuple[str, ...], tuple[int, ...] | None], Awaitable[dict]]


class PatchMetricKind(StrEnum):
    LOGIT_DIFF = "logit_diff"
    PROB = "prob"


@dataclass(frozen=True)
class PatchMetric:
    kind: PatchMetricKind
    target_id: int
    foil_id: int | None  # required for LOGIT_DIFF

    def __call__(self, normed_last: torch.Tensor, unembedding: torch.Tensor) -> float:
        """normed_last: [d_model] final-norm output at the last position; unembedding: [vocab, d_model]."""
        logits = unembedding @ normed_last.float()  # [vocab]
        if self.kind is PatchMetricKind.LOGIT_DIFF:
            return float(logits[self.target_id] - logits[self.foil_id])
        return float(torch.softmax(logits.double(), dim=0)[self.target_id])


@dataclass
class PatchGrid:
    layers: list[int]
    positions: list[int]
    metric: torch.Tensor  # [n_layers, n_positions] float32
    clean_metric: float
    corrupted_metric: float

    @property
    def restored(self) -> torch.Tensor:
        """(patched - corrupted) / (clean - corrupted): the share of the clean behaviour each cell restores."""
        span = self.clean_metric - self.corrupted_metric
        if span == 0:
            return torch.full_like(self.metric, float("nan"))
        return (self.metric - self.corrupted_metric) / span


async def patch_grid(
    forward: Forward,
    clean_ids: list[int],
    corrupted_ids: list[int],
    hook_kind: str,
    layers: Sequence[int],
    positions: Sequence[int],
    metric: PatchMetric,
    unembedding: torch.Tensor,
    clean_acts: dict[str, torch.Tensor] | None = None,
) -> PatchGrid:
    """`clean_acts` (hook -> [n_tokens, d_model], e.g. from a stored trace) saves recomputing the clean run's
    activations; the clean metric then needs only the final norm at the last position."""
    n_tokens = len(corrupted_ids)
    last = (n_tokens - 1,)
    hooks = tuple(f"blocks.{layer}.{hook_kind}" for layer in layers)
    if clean_acts is None:
        clean = await forward(clean_ids, (), (*hooks, LN_FINAL), None)
        clean_final = clean[LN_FINAL][-1]
    else:
        clean = clean_acts
        clean_final = (await forward(clean_ids, (), (LN_FINAL,), last))[LN_FINAL][0]
    corrupted = await forward(corrupted_ids, (), (LN_FINAL,), last)
    clean_metric = metric(clean_final, unembedding)
    corrupted_metric = metric(corrupted[LN_FINAL][0], unembedding)

    async def cell(hook: str, position: int) -> float:
        edit = EditOrder(
            op=EditOp.SET,
            hook=hook,
            rows=RowFilter(prompt_len=n_tokens, prompt_positions=(position,), generated=False),
            vector=tuple(clean[hook][position].tolist()),
        )
        patched = await forward(corrupted_ids, (edit,), (LN_FINAL,), last)
        return metric(patched[LN_FINAL][0], unembedding)

    values = await asyncio.gather(*(cell(hook, position) for hook in hooks for position in positions))
    grid = torch.tensor(values, dtype=torch.float32).reshape(len(hooks), len(positions))
    return PatchGrid(list(layers), list(positions), grid, clean_metric, corrupted_metric)
