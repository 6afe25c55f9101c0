"""Which token positions of a prompt to capture."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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
        if not self.indices:
            raise InvalidArgument("position mode INDICES needs at least one index")
        resolved = set()
        for index in self.indices:
            if not -prompt_len <= index < prompt_len:
                raise InvalidArgument(
                    f"position {index} out of range for a prompt of {prompt_len} tokens: "
                    f"valid indices are [{-prompt_len}, {prompt_len - 1}]"
                )
            resolved.add(index % prompt_len)
        return sorted(resolved)
