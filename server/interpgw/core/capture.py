"""The per-request capture order that travels to the engine worker inside `SamplingParams.extra_args`.

It is JSON-safe data only (no code, no tensors): the worker reads it once per request and decides, per
forward step, which rows of the flat `[num_tokens, d_model]` batch belong to this request and must be kept.
"""

from __future__ import annotations

from dataclasses import dataclass

EXTRA_ARGS_KEY = "interpgw"

# dtype names accepted for returned tensors ("" keeps the model's dtype)
CAPTURE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CaptureOrder:
    key: str  # gateway-side handle used to collect the results
    hooks: tuple[str, ...]  # canonical hook names, forward order
    prompt_len: int
    prompt_positions: tuple[int, ...] | None  # None: every prompt position
    generated: bool  # also capture generated tokens fed through the model
    dtype: str = ""  # "" keeps the model dtype
    fault: str = ""  # test-only fault injection, honoured only when the server enables it

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
        return data

    @classmethod
    def from_extra_args(cls, data: dict) -> CaptureOrder:
        positions = data.get("positions")
        return cls(
            key=str(data["key"]),
            hooks=tuple(data["hooks"]),
            prompt_len=int(data["prompt_len"]),
            prompt_positions=None if positions is None else tuple(int(p) for p in positions),
            generated=bool(data.get("generated", False)),
            dtype=str(data.get("dtype", "")),
            fault=str(data.get("fault", "")),
        )

    def n_prompt_rows(self) -> int:
        return self.prompt_len if self.prompt_positions is None else len(self.prompt_positions)


def itemsize(dtype: str, model_dtype: str) -> int:
    name = dtype or model_dtype
    return 4 if name == "float32" else 2


def estimate_capture_bytes(order: CaptureOrder, d_model: int, model_dtype: str, max_new_tokens: int) -> int:
    """Upper bound on the bytes one request's capture returns (generated rows: at most max_new_tokens - 1)."""
    rows = order.n_prompt_rows() + (max(max_new_tokens - 1, 0) if order.generated else 0)
    return rows * len(order.hooks) * d_model * itemsize(order.dtype, model_dtype)
