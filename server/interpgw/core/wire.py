"""Tensors on the wire: raw little-endian, row-major bytes with a torch dtype name and a shape, split into
chunks of at most CHUNK_BYTES so that no message comes near gRPC's default 4 MiB receive limit."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# 4 MiB minus room for the chunk's other fields: a chunk message stays under gRPC's default 4 MiB limit
CHUNK_BYTES = 4 * 2**20 - 4096

if sys.byteorder != "little":  # pragma: no cover - every platform vLLM supports is little-endian
    raise ImportError("interpgw's wire format assumes a little-endian host")


@dataclass(frozen=True)
class RawChunk:
    dtype: str
    shape: tuple[int, ...]
    offset: int
    total_bytes: int
    data: memoryview  # a view of the tensor's memory: valid while the tensor lives, copied only by the consumer


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire dtype name ("float32", "bfloat16", ...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def tensor_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[RawChunk]:
    """Split a tensor's bytes into chunks; an empty tensor still yields one (empty) chunk."""
    data = tensor.detach().cpu().contiguous()
    # flat byte view: slicing a multi-dimensional memoryview would slice rows, not bytes
    raw = memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else memoryview(b"")
    total = raw.nbytes
    shape = tuple(data.shape)
    name = dtype_name(data)
    offset = 0
    while True:
        piece = raw[offset : offset + chunk_bytes]
        yield RawChunk(dtype=name, shape=shape, offset=offset, total_bytes=total, data=piece)
        offset += len(piece)
        if offset >= total:
            return
