"""Which token positions a capture or an edit touches."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from interpgw.core.errors import InvalidArgument


class PositionMode(StrEnum):
    ALL = "all"
    LAST = "last"
    INDICES = "indices"
    NONE = "none"


@dataclass(frozen=True)
class PositionSelector:
    mode: PositionMode = PositionMode.ALL
    indices: tuple[int, ...] = field(default_factory=tuple)

    def resolve(self, prompt_len: int) -> list[int]:
        """Absolute, sorted, unique prompt positions; negative indices count from the prompt's end."""
        if self.mode is PositionMode.ALL:
            return list(range(prompt_len))
        if self.mode is PositionMode.LAST:
            return [prompt_len - 1]
        if self.mode is PositionMode.NONE:
            return []
        return list(resolve_indices(self.indices, prompt_len, "position"))


def resolve_indices(indices: tuple[int, ...], prompt_len: int, what: str) -> tuple[int, ...]:
    """Absolute, sorted, unique prompt indices (negative ones count from the end); InvalidArgument names the range."""
    if not indices:
        raise InvalidArgument(f"{what} mode INDICES needs at least one index")
    resolved = set()
    for index in indices:
        if not -prompt_len <= index < prompt_len:
            raise InvalidArgument(
                f"{what} {index} out of range for a prompt of {prompt_len} tokens: "
                f"valid indices are [{-prompt_len}, {prompt_len - 1}]"
            )
        resolved.add(index % prompt_len)
    return tuple(sorted(resolved))


@dataclass(frozen=True)
class RowFilter:
    """Which token states of one request a hook touches, in the engine's absolute-position terms.

    Shared by captures and edits. A request's rows arrive in steps (chunked prefill, then one generated token
    per step); each row is identified by its absolute position, so the filter needs no step bookkeeping.
    """

    prompt_len: int
    prompt_positions: tuple[int, ...] | None  # sorted absolute prompt positions; None: every prompt position
    generated: bool  # also generated tokens (positions >= prompt_len) fed back through the model
    window: tuple[int, int | None] = (0, None)  # absolute [start, end); end None: unbounded

    def mask(self, positions: np.ndarray) -> np.ndarray:
        """Boolean mask over one step's row positions `[n_rows]` of the rows this filter keeps."""
        in_prompt = positions < self.prompt_len
        if self.prompt_positions is None:
            keep = in_prompt
        else:
            keep = in_prompt & np.isin(positions, np.asarray(self.prompt_positions, dtype=np.int64))
        if self.generated:
            keep = keep | ~in_prompt
        start, end = self.window
        if start > 0:
            keep &= positions >= start
        if end is not None:
            keep &= positions < end
        return keep

    def to_json(self) -> dict:
        return {
            "prompt_len": self.prompt_len,
            "positions": None if self.prompt_positions is None else list(self.prompt_positions),
            "generated": self.generated,
            "window": list(self.window),
        }

    @classmethod
    def from_json(cls, data: dict) -> RowFilter:
        positions = data.get("positions")
        window = data.get("window") or (0, None)
        return cls(
            prompt_len=int(data["prompt_len"]),
            prompt_positions=None if positions is None else tuple(int(p) for p in positions),
            generated=bool(data.get("generated", False)),
            window=(int(window[0]), None if window[1] is None else int(window[1])),
        )
