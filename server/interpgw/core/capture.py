"""The per-request order for the hooks, travelling to the engine worker inside `SamplingParams.extra_args`.

It is JSON-safe data only (no code): the worker reads it once per request and decides, per forward step,
which rows of the flat `[num_tokens, d_model]` batch belong to this request, which of them to record and
which to edit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from interpgw.core.interventions import EditOrder, check_edit_gain
from interpgw.core.positions import RowFilter
from interpgw.signals.orders import SignalOrder

EXTRA_ARGS_KEY = "interpgw"

# dtype names accepted for returned tensors ("" keeps the model's dtype)
CAPTURE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HookOrder:
    key: str  # gateway-side handle used to collect the results
    hooks: tuple[str, ...]  # canonical hook names to capture, forward order (may be empty: edits only)
    prompt_len: int
    prompt_positions: tuple[int, ...] | None  # None: every prompt position
    generated: bool  # also capture generated tokens fed through the model
    dtype: str = ""  # "" keeps the model dtype
    fault: str = ""  # test-only fault injection, honoured only when the server enables it
    edits: tuple[EditOrder, ...] = ()  # applied in this order at each hook, before that hook is recorded
    signals: SignalOrder | None = None  # per-token signals and monitors (Generate)

    def __post_init__(self) -> None:
        # every edit this request may apply, its own and those its monitors may arm, is bounded together here
        armed = [edit for m in self.signals.monitors for edit in m.edits] if self.signals is not None else []
        check_edit_gain([*self.edits, *armed])

    def to_extra_args(self) -> dict:
        data = {
            "key": self.key,
            "hooks": list(self.hooks),
            "prompt_len": self.prompt_len,
            "positions": None if self.prompt_positions is None else list(self.prompt_positions),
            "generated": self.generated,
            "dtype": self.dtype,
        }
        if self.fault:
            data["fault"] = self.fault
        if self.edits:
            data["edits"] = [edit.to_json() for edit in self.edits]
        if self.signals is not None:
            data["signals"] = self.signals.to_json()
        return data

    @classmethod
    def from_extra_args(cls, data: dict) -> HookOrder:
        positions = data.get("positions")
        return cls(
            key=str(data["key"]),
            hooks=tuple(data["hooks"]),
            prompt_len=int(data["prompt_len"]),
            prompt_positions=None if positions is None else tuple(int(p) for p in positions),
            generated=bool(data.get("generated", False)),
            dtype=str(data.get("dtype", "")),
            fault=str(data.get("fault", "")),
            edits=tuple(EditOrder.from_json(e) for e in data.get("edits") or ()),
            signals=SignalOrder.from_json(data["signals"]) if data.get("signals") is not None else None,
        )

    @property
    def may_edit(self) -> bool:
        """Edits now, or a monitor may arm some later: the request's KV then differs from a plain request's."""
        return bool(self.edits) or self._armed_edits() != []

    def _armed_edits(self) -> list[dict]:
        if self.signals is None:
            return []
        return [m.to_json() for m in self.signals.monitors if m.edits]

    def edit_salt(self) -> str:
        """Equal for requests with equal edits (they may share cached KV), different otherwise."""
        data = json.dumps([[edit.to_json() for edit in self.edits], self._armed_edits()], sort_keys=True).encode()
        return "interpgw-edits-" + hashlib.sha256(data).hexdigest()[:32]

    def capture_rows(self) -> RowFilter:
        return RowFilter(prompt_len=self.prompt_len, prompt_positions=self.prompt_positions, generated=self.generated)

    def n_prompt_rows(self) -> int:
        return self.prompt_len if self.prompt_positions is None else len(self.prompt_positions)


def itemsize(dtype: str, model_dtype: str) -> int:
    name = dtype or model_dtype
    return 4 if name == "float32" else 2


def estimate_capture_bytes(order: HookOrder, d_model: int, model_dtype: str, max_new_tokens: int) -> int:
    """Upper bound on the bytes one request's capture returns (generated rows: at most max_new_tokens - 1)."""
    rows = order.n_prompt_rows() + (max(max_new_tokens - 1, 0) if order.generated else 0)
    return rows * len(order.hooks) * d_model * itemsize(order.dtype, model_dtype)
