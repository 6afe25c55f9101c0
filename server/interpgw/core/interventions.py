"""Declarative activation edits: what a client may ask, and the arithmetic that carries it out.

No code crosses the wire: a client names an op, a hook point, the positions and (for most ops) a direction.
The service resolves that into `EditOrder`s (absolute positions, a concrete vector) that travel to the engine
worker as JSON inside the request's sampling parameters; the worker applies them with `apply_edit` to the
rows of the flat `[num_tokens, d_model]` batch that belong to the request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from interpgw.core.errors import InvalidArgument
from interpgw.core.positions import RowFilter, resolve_indices


class EditOp(StrEnum):
    ADD = "add"  # x + scale * v
    SET = "set"  # scale * v
    ZERO = "zero"  # 0 (ablate)
    SCALE = "scale"  # scale * x
    PROJECT_OUT = "project_out"  # x - (x . u) u, u = v / |v|
    CLAMP = "clamp"  # x + (value - x . u) u
    MEAN_ABLATE = "mean_ablate"  # the mean activation over reference prompts (resolved into SET)


VECTOR_OPS = frozenset({EditOp.ADD, EditOp.SET, EditOp.PROJECT_OUT, EditOp.CLAMP})
DIRECTION_OPS = frozenset({EditOp.PROJECT_OUT, EditOp.CLAMP})  # the vector is a direction: must not be zero


class TargetMode(StrEnum):
    ALL = "all"  # every prompt and generated position
    PROMPT = "prompt"
    GENERATED = "generated"
    INDICES = "indices"  # explicit prompt indices, negative from the prompt's end
    LAST_N = "last_n"  # the last n prompt positions


@dataclass(frozen=True)
class TargetSpec:
    """Positions an intervention edits, as the client said it."""

    mode: TargetMode = TargetMode.ALL
    indices: tuple[int, ...] = ()
    n: int = 0
    window_start: int | None = None
    window_end: int | None = None

    def resolve(self, prompt_len: int) -> RowFilter:
        """Absolute positions; InvalidArgument names the valid range."""
        generated = self.mode in (TargetMode.ALL, TargetMode.GENERATED)
        positions: tuple[int, ...] | None = None
        if self.mode is TargetMode.GENERATED:
            positions = ()
        elif self.mode is TargetMode.INDICES:
            positions = resolve_indices(self.indices, prompt_len, "target index")
        elif self.mode is TargetMode.LAST_N:
            if not 1 <= self.n <= prompt_len:
                raise InvalidArgument(f"target LAST_N needs n in [1, {prompt_len}] (the prompt's length), got {self.n}")
            positions = tuple(range(prompt_len - self.n, prompt_len))
        start = 0 if self.window_start is None else self.window_start
        end = self.window_end
        if start < 0 or (end is not None and end <= start):
            raise InvalidArgument(
                f"target window [{self.window_start}, {self.window_end}) must satisfy 0 <= start < end "
                "(absolute positions over prompt and output)"
            )
        return RowFilter(prompt_len=prompt_len, prompt_positions=positions, generated=generated, window=(start, end))


@dataclass(frozen=True)
class InterventionSpec:
    """One intervention as the client sent it (transport-neutral)."""

    op: EditOp
    hook: str = ""  # "" with a registry vector: every hook the vector holds
    target: TargetSpec = field(default_factory=TargetSpec)
    vector: torch.Tensor | None = None  # inline [d_model]
    vector_id: str = ""
    scale: float | None = None  # unset: 1
    value: float = 0.0
    norm_preserving: bool = False
    reference_prompts: tuple[Any, ...] = ()  # PromptInput, for MEAN_ABLATE
    reference_traces: tuple[str, ...] = ()  # stored trace handles, for MEAN_ABLATE


@dataclass(frozen=True)
class EditOrder:
    """A resolved edit, JSON-safe: travels to the engine worker in `SamplingParams.extra_args`."""

    op: EditOp  # never MEAN_ABLATE: the service turns it into SET
    hook: str  # canonical hook name
    rows: RowFilter
    vector: tuple[float, ...] | None  # [d_model]
    scale: float = 1.0
    value: float = 0.0
    norm_preserving: bool = False

    def to_json(self) -> dict:
        return {
            "op": self.op.value,
            "hook": self.hook,
            "rows": self.rows.to_json(),
            "vector": None if self.vector is None else list(self.vector),
            "scale": self.scale,
            "value": self.value,
            "norm_preserving": self.norm_preserving,
        }

    @classmethod
    def from_json(cls, data: dict) -> EditOrder:
        vector = data.get("vector")
        return cls(
            op=EditOp(data["op"]),
            hook=str(data["hook"]),
            rows=RowFilter.from_json(data["rows"]),
            vector=None if vector is None else tuple(float(v) for v in vector),
            scale=float(data.get("scale", 1.0)),
            value=float(data.get("value", 0.0)),
            norm_preserving=bool(data.get("norm_preserving", False)),
        )

    def vector_tensor(self) -> torch.Tensor | None:
        return None if self.vector is None else torch.tensor(self.vector, dtype=torch.float32)  # [d_model]

    @property
    def is_plain_add(self) -> bool:
        """An add whose result does not depend on x: many of them batch into one `index_add_`."""
        return self.op is EditOp.ADD and not self.norm_preserving


def apply_edit(
    x: torch.Tensor,  # [n_rows, d_model] float32
    op: EditOp,
    vector: torch.Tensor | None,  # [d_model] float32
    scale: float = 1.0,
    value: float = 0.0,
    norm_preserving: bool = False,
) -> torch.Tensor:
    """The edited rows `[n_rows, d_model]` (a new tensor; `x` is not modified)."""
    if op is EditOp.ADD:
        out = x + scale * vector
    elif op is EditOp.SET:
        out = (scale * vector).expand_as(x).clone()
    elif op is EditOp.ZERO:
        out = torch.zeros_like(x)
    elif op is EditOp.SCALE:
        out = x * scale
    elif op in (EditOp.PROJECT_OUT, EditOp.CLAMP):
        unit = vector / vector.norm()
        component = x @ unit  # [n_rows]
        target = 0.0 if op is EditOp.PROJECT_OUT else value
        out = x + (target - component).unsqueeze(1) * unit
    else:
        raise ValueError(f"op {op} is not applied in the forward pass (resolve it first)")
    if norm_preserving:
        before = x.norm(dim=1, keepdim=True)
        after = out.norm(dim=1, keepdim=True)
        out = torch.where(after > 0, out * (before / after.clamp_min(1e-30)), out)
    return out


# Bounds that keep every edited activation far inside float32's (and bfloat16's) range, whatever the request
# combines: a vector's entries are at most MAX_VECTOR_ABS (real activations stay below ~1e5; SmolLM2's largest
# is ~2.2e4), and the ops that multiply activations (SCALE, not norm-preserving) multiply them by at most
# MAX_EDIT_GAIN over all of one request's edits, including those its monitors may arm. An edit that overflowed
# to Inf would not only spoil its own request: the engine keeps the non-finite keys and values in its KV cache,
# and blocks are reused by later requests, whose attention then turns NaN (measured on vLLM CPU).
MAX_VECTOR_ABS = 1e6
MAX_EDIT_GAIN = 1e6


def check_vector(vector: torch.Tensor, d_model: int, what: str) -> torch.Tensor:
    """A float32 `[d_model]` vector, or InvalidArgument saying what is wrong with it."""
    if vector.dim() == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if tuple(vector.shape) != (d_model,):
        raise InvalidArgument(f"{what} has shape {list(vector.shape)}; this model needs [{d_model}] (d_model)")
    if not bool(torch.isfinite(vector).all()):
        raise InvalidArgument(f"{what} contains NaN or Inf values")
    largest = float(vector.abs().max()) if vector.numel() else 0.0
    if largest > MAX_VECTOR_ABS:
        bound = f"{MAX_VECTOR_ABS:g}"
        raise InvalidArgument(f"{what} has an entry of magnitude {largest:g}; entries must be in [-{bound}, {bound}]")
    return vector.to(torch.float32)


def check_number(value: float, name: str, bound: float) -> float:
    if not math.isfinite(value) or abs(value) > bound:
        raise InvalidArgument(f"{name} must be a finite number in [-{bound:g}, {bound:g}], got {value}")
    return float(value)


def edit_gain(edits: Iterable[EditOrder]) -> float:
    """How much `edits` together can multiply an activation's magnitude: the product of |scale| over the SCALE
    edits that are not norm-preserving (every other op adds a bounded vector, replaces, removes or clamps)."""
    gain = 1.0
    for edit in edits:
        if edit.op is EditOp.SCALE and not edit.norm_preserving:
            gain *= max(1.0, abs(edit.scale))
    return gain


def check_edit_gain(edits: Iterable[EditOrder]) -> None:
    """InvalidArgument when one request's edits could multiply activations by more than MAX_EDIT_GAIN."""
    gain = edit_gain(edits)
    if gain > MAX_EDIT_GAIN:
        raise InvalidArgument(
            f"the scale interventions of this request multiply activations by up to {gain:.3g} in all; at most "
            f"{MAX_EDIT_GAIN:g} is allowed (larger values overflow the model's numbers)"
        )
