"""Decoding wire tensors. numpy has no bfloat16: bf16 becomes float32 (exact, every bf16 is a float32),
unless torch is asked for, which keeps the dtype."""

from __future__ import annotations

from typing import Any

import numpy as np

_NUMPY = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def to_numpy(dtype: str, shape: tuple[int, ...], data: bytes | bytearray | np.ndarray) -> np.ndarray:
    """Decode; a bytearray or uint8 array is used in place (the result owns it from then on), bytes are copied."""
    if dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype not in _NUMPY:
        raise ValueError(f"unsupported tensor dtype {dtype!r}")
    array = np.frombuffer(data, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).reshape(shape)
    return array if isinstance(data, bytearray | np.ndarray) else array.copy()


def to_torch(dtype: str, shape: tuple[int, ...], data: bytes | bytearray | np.ndarray) -> Any:
    import torch

    torch_dtype = getattr(torch, dtype)
    if not len(data):
        return torch.empty(shape, dtype=torch_dtype)
    buffer = data if isinstance(data, bytearray | np.ndarray) else bytearray(data)
    return torch.frombuffer(buffer, dtype=torch_dtype).reshape(shape)


def decode(dtype: str, shape: tuple[int, ...], data: bytes | bytearray | np.ndarray, as_torch: bool = False) -> Any:
    return to_torch(dtype, shape, data) if as_torch else to_numpy(dtype, shape, data)


def is_index(value: object) -> bool:
    """An int or numpy integer, not a bool (positions, layers and counts accept numpy's integers too)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
