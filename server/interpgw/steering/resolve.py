"""From interventions as clients send them to edits the engine applies.

Resolution happens in two stages because a Trace applies one list of interventions to prompts of different
lengths: `prepare` does the work that does not depend on the prompt once (registry lookups, validation,
mean-ablation references, expanding a multi-hook vector), `orders` then places each prepared edit on one
prompt's positions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from interpgw.config import LimitsConfig
from interpgw.core.errors import InvalidArgument, NotFound
from interpgw.core.hookpoints import parse_hook
from interpgw.core.interventions import (
    DIRECTION_OPS,
    VECTOR_OPS,
    EditOp,
    EditOrder,
    InterventionSpec,
    TargetSpec,
    check_number,
    check_vector,
)
from interpgw.core.requests import quoted
from interpgw.engine.base import ModelFacts
from interpgw.registry.store import VectorStore

# Mean of one hook's activations over reference prompts and stored traces: (hook, prompts, handles) -> [d_model]
ReferenceMean = Callable[[str, Sequence[object], Sequence[str]], Awaitable[torch.Tensor]]


@dataclass(frozen=True)
class PreparedEdit:
    op: EditOp  # never MEAN_ABLATE
    hook: str  # canonical
    target: TargetSpec
    vector: torch.Tensor | None  # [d_model] float32
    scale: float
    value: float
    norm_preserving: bool

    def order(self, prompt_len: int) -> EditOrder:
        vector = None if self.vector is None else tuple(self.vector.tolist())
        return EditOrder(
            op=self.op,
            hook=self.hook,
            rows=self.target.resolve(prompt_len),
            vector=vector,
            scale=self.scale,
            value=self.value,
            norm_preserving=self.norm_preserving,
        )


class InterventionResolver:
    def __init__(self, facts: ModelFacts, limits: LimitsConfig, vectors: VectorStore, reference_mean: ReferenceMean):
        self._facts = facts
        self._limits = limits
        self._vectors = vectors
        self._reference_mean = reference_mean

    async def prepare(self, specs: Sequence[InterventionSpec]) -> list[PreparedEdit]:
        prepared: list[PreparedEdit] = []
        for index, spec in enumerate(specs):
            try:
                prepared.extend(await self._prepare_one(spec))
            except (InvalidArgument, NotFound) as exc:
                raise type(exc)(f"intervention {index}: {exc}") from None
            if len(prepared) > self._limits.max_interventions:
                raise InvalidArgument(
                    f"too many interventions: at most {self._limits.max_interventions} per request "
                    "(a registry vector without a hook counts once per hook it holds)"
                )
        return prepared

    @staticmethod
    def orders(prepared: Sequence[PreparedEdit], prompt_len: int) -> tuple[EditOrder, ...]:
        return tuple(edit.order(prompt_len) for edit in prepared)

    async def _prepare_one(self, spec: InterventionSpec) -> list[PreparedEdit]:
        facts, limits = self._facts, self._limits
        scale = check_number(1.0 if spec.scale is None else spec.scale, "scale", limits.max_edit_scale)
        value = check_number(spec.value, "value", limits.max_edit_scale)
        has_vector = spec.vector is not None or bool(spec.vector_id)
        if spec.op in VECTOR_OPS and not has_vector:
            raise InvalidArgument(f"op {spec.op.value} needs a vector (inline tensor or vector_id)")
        if spec.op not in VECTOR_OPS and has_vector:
            raise InvalidArgument(f"op {spec.op.value} takes no vector")
        if spec.op is EditOp.MEAN_ABLATE:
            return [await self._mean_ablation(spec)]
        if spec.reference_prompts or spec.reference_traces:
            raise InvalidArgument("reference_prompts and reference_traces are for op mean_ablate only")

        hooks_and_vectors: list[tuple[str, torch.Tensor | None]]
        if spec.vector_id:
            hooks_and_vectors = await self._registry_vectors(spec)
        else:
            if not spec.hook:
                raise InvalidArgument("hook is required (it may be empty only with a registry vector)")
            hook = parse_hook(spec.hook, facts.n_layers).name
            vector = None if spec.vector is None else check_vector(spec.vector, facts.d_model, "inline vector")
            hooks_and_vectors = [(hook, vector)]
        edits = []
        for hook, vector in hooks_and_vectors:
            if spec.op in DIRECTION_OPS and float(vector.norm()) == 0.0:
                raise InvalidArgument(f"op {spec.op.value} needs a non-zero direction; the vector is all zeros")
            edits.append(PreparedEdit(spec.op, hook, spec.target, vector, scale, value, spec.norm_preserving))
        return edits

    async def _registry_vectors(self, spec: InterventionSpec) -> list[tuple[str, torch.Tensor]]:
        facts = self._facts
        record = await self._vectors.get(spec.vector_id)
        if record is None or record.kind != "vector":  # a probe's id names a probe, not a steering vector
            raise NotFound(f"no steering vector with id {quoted(spec.vector_id)}")
        if record.model != facts.id or record.d_model != facts.d_model:
            raise InvalidArgument(
                f"vector {record.id} belongs to model {record.model!r} (d_model {record.d_model}); this request "
                f"uses {facts.id!r} (d_model {facts.d_model})"
            )
        hooks = record.hooks
        if spec.hook:
            hook = parse_hook(spec.hook, facts.n_layers).name
            if hook not in record.hooks:
                raise InvalidArgument(
                    f"vector {record.id} has no direction for {hook}; it holds: {', '.join(record.hooks)} "
                    "(leave hook empty to use all of them)"
                )
            hooks = (hook,)
        # records stored before the bounds of `check_vector` existed are held to them too
        return [
            (hook, check_vector(record.vector_for(hook), facts.d_model, f"vector {record.id} at {hook}"))
            for hook in hooks
        ]

    async def _mean_ablation(self, spec: InterventionSpec) -> PreparedEdit:
        if not spec.hook:
            raise InvalidArgument("op mean_ablate needs a hook")
        n_refs = len(spec.reference_prompts) + len(spec.reference_traces)
        if not 1 <= n_refs <= self._limits.max_reference_prompts:
            raise InvalidArgument(
                f"op mean_ablate needs 1 to {self._limits.max_reference_prompts} reference prompts or stored traces, "
                f"got {n_refs}"
            )
        hook = parse_hook(spec.hook, self._facts.n_layers).name
        mean = await self._reference_mean(hook, spec.reference_prompts, spec.reference_traces)  # [d_model]
        mean = check_vector(mean, self._facts.d_model, f"the mean of the references at {hook}")
        return PreparedEdit(EditOp.SET, hook, spec.target, mean, 1.0, 0.0, spec.norm_preserving)
