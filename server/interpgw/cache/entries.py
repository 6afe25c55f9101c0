"""One cached activation trace, its self-checking byte form, and the content address it is stored under.

An entry is serialized as a safetensors blob (one tensor per hook name, every other field as JSON in the header
metadata) so that it is one opaque value for a key-value store, readable by ordinary safetensors tooling, and never
unpickled. Tensors keep their dtype and bits exactly (bfloat16 included): a cache hit must return what a fresh run
would have returned, byte for byte.

A CRC-32 travels in the metadata and covers everything the entry holds: the JSON fields, and each tensor's name,
dtype, shape and bytes in sorted-name order. A truncated, bit-flipped or foreign value in a shared store (Redis) is
then reported as `CorruptEntry` instead of being served to a client as if it were the model's activations. CRC-32
catches every burst error up to 32 bits and any other damage with probability 1 - 2^-32, which is what a check
against accidental damage needs; it is not a defence against someone who can write to the store (neither was the
sha256 of format 1: whoever can change the value can recompute an unkeyed hash too). It costs 11 ms over a 45 MiB
entry here against sha256's 26 ms, on every cache hit. Format 1 entries are still read (a stored trace's handle,
given to a client, names its value directly and must outlive an upgrade); cache keys include the format, so a
cache lookup never meets one.

Reading parses the safetensors layout here rather than through `safetensors.torch.load`: that returns tensors backed
by immutable `bytes` (read-only memory, with a warning) and would need a second copy to fix; this way each tensor is
copied once, straight into memory it owns, and checked as it is copied. The value may arrive in pieces (a large
Redis value is read as byte ranges): `from_pieces` reads across them without first joining them into one buffer,
which for 45 MiB cost 20-30 ms of freshly allocated memory per hit.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from interpgw.core.errors import Internal

METADATA_KEY = "interpgw"  # safetensors metadata key holding the JSON of every non-tensor field
FORMAT_VERSION = 2  # written; format 1 (sha256) is still read: stored traces' handles outlive an upgrade
KEY_PREFIX = "tr_"
KEY_HEX_CHARS = 40

# The float dtypes an entry may hold, by the dtype names safetensors writes in its header.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_BODY_FIELDS = ("format", "token_ids", "positions", "top_logits", "meta")  # JSON fields, in the order written


class CorruptEntry(Internal, ValueError):
    """Stored entry bytes failed to parse or their integrity check (truncated, bit-flipped, foreign data)."""


def cache_key(parts: dict[str, Any]) -> str:
    """The content address of a trace: "tr_" + 40 hex characters of a sha256 over canonical JSON of `parts`.

    `parts` must name everything that determines the trace (model id, weights revision, token ids, hooks, positions,
    interventions, dtype, ...) and be JSON-safe. Canonical JSON (sorted keys, no whitespace) makes the key independent
    of dict insertion order, so every replica computes the same key for the same request. Values are compared as JSON:
    1 and 1.0 (or 1 and true) give different keys, so callers should pass each part in one consistent type.

    The entry format version is hashed in too: a gateway writing a newer byte format then uses other keys than an
    older replica sharing the same Redis, instead of each deleting the other's entries as "corrupt".
    """
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"interpgw-trace-v{FORMAT_VERSION}\n{text}".encode()).hexdigest()
    return KEY_PREFIX + digest[:KEY_HEX_CHARS]


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 array, without copying (any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class _Crc32:
    """zlib.crc32 with hashlib's update/hexdigest interface."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Any) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


# format -> (metadata field, checksum state factory)
_CHECKSUMS: dict[int, tuple[str, Callable[[], Any]]] = {1: ("sha256", hashlib.sha256), 2: ("crc32", _Crc32)}


def _checksum(fmt: int, body_text: str, tensors: list[tuple[str, str, list[int], Iterator[Any]]]) -> str:
    """The checksum of format `fmt` over the JSON body, then per tensor (sorted by name) its [name, dtype, shape]
    JSON and its bytes, which each tensor gives as an iterator of buffers (consumed here, in order).

    Name, dtype and shape are covered as well as the bytes, so a header flip that renames a tensor or turns "F16"
    into "BF16" (same size, different numbers) is caught too. Each piece is self-delimiting, so the concatenation
    is unambiguous.
    """
    state = _CHECKSUMS[fmt][1]()
    state.update(body_text.encode())
    for name, dtype, shape, buffers in sorted(tensors, key=lambda item: item[0]):
        state.update(json.dumps([name, dtype, shape], separators=(",", ":")).encode())
        for buffer in buffers:
            state.update(buffer)
    return state.hexdigest()


class _Pieces:
    """A byte string held as consecutive pieces, read by offset without joining them."""

    def __init__(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        self._views = [memoryview(piece).cast("B") for piece in pieces]
        self._starts = list(itertools.accumulate((len(v) for v in self._views), initial=0))  # [n_pieces + 1]
        self.size = self._starts[-1]

    def ranges(self, start: int, end: int) -> Iterator[memoryview]:
        """Views of the bytes [start, end) (0 <= start <= end <= size), piece by piece, no copies."""
        i = bisect.bisect_right(self._starts, start) - 1
        while start < end:
            view = self._views[i]
            lo = start - self._starts[i]
            part = view[lo : lo + (end - start)]
            yield part
            start += len(part)
            i += 1

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.ranges(start, end))


def _body_text(body: dict[str, Any]) -> str:
    # Not sort_keys: JSON text -> dict -> JSON text reproduces the same text only if key order is kept as parsed
    # (sorting would reorder int keys, which JSON turns into strings, differently on each side).
    return json.dumps(body, separators=(",", ":"))


@dataclass(eq=False)
class CachedTrace:
    """The captured activations of one request: one tensor per hook, one row per captured position."""

    token_ids: list[int]  # the whole token sequence the trace was computed on
    positions: list[int]  # absolute position of each tensor row
    tensors: dict[str, torch.Tensor] = field(repr=False)  # hook name -> [n_positions, d_model], CPU, contiguous
    top_logits: dict | None = field(default=None, repr=False)  # JSON-safe
    meta: dict = field(default_factory=dict)  # JSON-safe

    def __post_init__(self) -> None:
        self.token_ids = [int(t) for t in self.token_ids]
        self.positions = [int(p) for p in self.positions]
        if self.top_logits is not None and not isinstance(self.top_logits, dict):
            raise TypeError(f"top_logits must be a dict or None, got {type(self.top_logits).__name__}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in self.tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"invalid hook name {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor for {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor for {name!r} is {tensor.dtype}; supported: {sorted(map(str, _DTYPE_NAMES))}")
            if tensor.dim() != 2 or tensor.shape[0] != len(self.positions):
                raise ValueError(
                    f"tensor for {name!r} has shape {tuple(tensor.shape)}, expected [n_positions="
                    f"{len(self.positions)}, d_model]"
                )
            # [n_positions, d_model], same dtype: moved and packed, never converted
            tensors[name] = tensor.detach().to(device="cpu").contiguous()
        self.tensors = tensors

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what the cache's size limits are about; the JSON fields are usually small)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "token_ids": self.token_ids,
            "positions": self.positions,
            "top_logits": self.top_logits,
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors under their hook names, the JSON fields and CRC-32 under "interpgw".

        TypeError/ValueError if `top_logits` or `meta` is not JSON-serializable (a caller bug, not a cache problem).
        """
        body = self._body()
        specs = [(name, _DTYPE_NAMES[t.dtype], list(t.shape), iter([_raw(t)])) for name, t in self.tensors.items()]
        header = _body_text({**body, "crc32": _checksum(FORMAT_VERSION, _body_text(body), specs)})
        metadata = {METADATA_KEY: header}
        try:
            return st_save(self.tensors, metadata=metadata)
        except RuntimeError:
            # safetensors refuses tensors that overlap in memory (one capture stored under two hook names):
            # save independent copies; the bytes, and so the checksum, are the same.
            return st_save({name: t.clone() for name, t in self.tensors.items()}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> CachedTrace:
        """Parse `to_bytes` output; CorruptEntry on truncation, parse failure or checksum mismatch.

        The returned tensors own their memory (writable, independent of `data`).
        """
        return cls.from_pieces([data])

    @classmethod
    def from_pieces(cls, pieces: Sequence[bytes | bytearray | memoryview]) -> CachedTrace:
        """`from_bytes` of the concatenation of `pieces`, without making it."""
        value = _Pieces(pieces)
        if value.size < 8:
            raise CorruptEntry(f"trace entry truncated: {value.size} bytes")
        (header_len,) = struct.unpack("<Q", value.read(0, 8))
        if header_len > value.size - 8:
            raise CorruptEntry(f"trace entry truncated: header of {header_len} bytes, {value.size - 8} present")
        try:
            header = json.loads(value.read(8, 8 + header_len))
            body = json.loads(header.pop("__metadata__")[METADATA_KEY])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CorruptEntry(f"trace entry header unreadable: {exc!r}") from exc
        if not isinstance(body, dict):
            raise CorruptEntry("trace entry metadata is not a JSON object")
        fmt = body.get("format")
        if fmt not in _CHECKSUMS or isinstance(fmt, bool):
            raise CorruptEntry(f"unsupported trace entry format {fmt!r}")
        stored_checksum = body.pop(_CHECKSUMS[fmt][0], None)
        if tuple(body) != _BODY_FIELDS:
            raise CorruptEntry(f"trace entry metadata has fields {sorted(body)}, expected {sorted(_BODY_FIELDS)}")

        data_start = 8 + header_len
        specs = _tensor_specs(header, value.size - data_start)
        tensors = {name: torch.empty(shape, dtype=DTYPES[dtype]) for name, dtype, shape, _, _ in specs}

        def copied(name: str, start: int, end: int) -> Iterator[memoryview]:
            """The tensor's bytes as they are copied into it: checked and copied in one pass."""
            out = _raw(tensors[name])  # [n_bytes] uint8 view of the new tensor
            filled = 0
            for part in value.ranges(data_start + start, data_start + end):
                out[filled : filled + len(part)] = np.frombuffer(part, dtype=np.uint8)
                filled += len(part)
                yield part

        checks = [(name, dtype, shape, copied(name, start, end)) for name, dtype, shape, start, end in specs]
        if stored_checksum != _checksum(fmt, _body_text(body), checks):
            raise CorruptEntry("trace entry checksum mismatch")
        token_ids, positions, top_logits, meta = (body[k] for k in _BODY_FIELDS[1:])
        ok = (
            _is_int_list(token_ids)
            and _is_int_list(positions)
            and (top_logits is None or isinstance(top_logits, dict))
            and isinstance(meta, dict)
        )
        if not ok:
            raise CorruptEntry("trace entry metadata field of the wrong type")
        try:
            return cls(token_ids=token_ids, positions=positions, tensors=tensors, top_logits=top_logits, meta=meta)
        except (TypeError, ValueError) as exc:
            raise CorruptEntry(f"trace entry inconsistent: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        """Field-wise equality; tensors must have the same dtype, shape and bits (NaN payloads included)."""
        if not isinstance(other, CachedTrace):
            return NotImplemented
        if self._body() != other._body() or self.tensors.keys() != other.tensors.keys():
            return False
        for name, tensor in self.tensors.items():
            theirs = other.tensors[name]
            if tensor.dtype != theirs.dtype or tensor.shape != theirs.shape:
                return False
            if not np.array_equal(_raw(tensor), _raw(theirs)):
                return False
        return True

    def __repr__(self) -> str:
        d_model = next(iter(self.tensors.values())).shape[1] if self.tensors else 0
        return (
            f"CachedTrace(n_tokens={len(self.token_ids)}, n_positions={len(self.positions)}, d_model={d_model}, "
            f"hooks={list(self.tensors)}, nbytes={self.nbytes})"
        )


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _tensor_specs(header: dict[str, Any], data_len: int) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, start, end) of each tensor, validated: known float dtype, 2-D shape whose size matches
    its byte range, and ranges that tile the data section exactly (no gap, overlap or trailing bytes)."""
    specs = []
    for name, spec in header.items():
        try:
            dtype, shape, (start, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise CorruptEntry(f"trace entry tensor {name!r}: malformed header entry") from exc
        if dtype not in DTYPES:
            raise CorruptEntry(f"trace entry tensor {name!r}: unsupported dtype {dtype!r}")
        if not (_is_int_list(shape) and len(shape) == 2 and min(shape) >= 0 and _is_int_list([start, end])):
            raise CorruptEntry(f"trace entry tensor {name!r}: bad shape {shape!r} or offsets {[start, end]!r}")
        itemsize = DTYPES[dtype].itemsize
        if not 0 <= start <= end or end - start != math.prod(shape) * itemsize:
            raise CorruptEntry(f"trace entry tensor {name!r}: offsets {[start, end]} do not fit shape {shape}")
        specs.append((name, dtype, shape, start, end))
    expected = 0
    for _, _, _, start, end in sorted(specs, key=lambda s: (s[3], s[4])):
        if start != expected:
            raise CorruptEntry("trace entry tensor data is not contiguous")
        expected = end
    if expected != data_len:
        raise CorruptEntry(f"trace entry truncated or padded: {data_len} data bytes, header describes {expected}")
    return specs
