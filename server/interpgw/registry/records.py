"""One stored steering vector and its self-checking byte form.

A record is serialized as a safetensors blob (the tensor under "vector", every other field as JSON in the header
metadata) so that it is one opaque value for a key-value store, readable by ordinary safetensors tooling, and never
unpickled. A sha256 of the tensor bytes travels in the metadata: a truncated or bit-flipped value in the store is
reported as `CorruptRecord` instead of silently steering a model with garbage.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from interpgw.registry.errors import CorruptRecord

TENSOR_KEY = "vector"  # safetensors tensor name
METADATA_KEY = "interpgw"  # safetensors metadata key holding the JSON of every other field
FORMAT_VERSION = 1
METHODS = ("tensor", "mean_diff", "pca", "logistic")
KINDS = ("vector", "probe")  # steering vectors and linear probes share the registry (both: rows of [d_model])


def new_vector_id() -> str:
    """A fresh registry id: "vec_" + 16 hex characters."""
    return "vec_" + uuid.uuid4().hex[:16]


def new_probe_id() -> str:
    """A fresh probe id: "prb_" + 16 hex characters."""
    return "prb_" + uuid.uuid4().hex[:16]


def _digest(tensor: torch.Tensor) -> str:
    """sha256 of the raw bytes of a contiguous CPU float32 tensor."""
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


@dataclass(eq=False)
class VectorRecord:
    """A named steering vector (one row per hook point of one model), or a linear probe (kind "probe": one row,
    the weight; bias, metrics and calibration in `extra`)."""

    id: str
    model: str
    d_model: int
    hooks: tuple[str, ...]  # canonical hook names, one per tensor row
    tensor: torch.Tensor = field(repr=False)  # [len(hooks), d_model] float32, CPU, contiguous
    method: str  # "tensor" | "mean_diff" | "pca"
    n_pairs: int  # contrast pairs the vector was computed from (0 for "tensor")
    created: float  # unix seconds
    name: str = ""
    description: str = ""
    separation: tuple[float, ...] = ()  # per-hook separation score of the contrast (empty for "tensor")
    owner: str = ""  # tenant that created it; "" = created with authentication off (visible to every tenant)
    public: bool = False  # published: every tenant may read and use it; only its owner may delete it
    kind: str = "vector"  # "vector" | "probe"
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-safe kind-specific fields (probes: bias, auroc, ...)

    def __post_init__(self) -> None:
        self.hooks = tuple(self.hooks)
        self.separation = tuple(float(s) for s in self.separation)
        if not isinstance(self.tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(self.tensor).__name__}")
        # [n_hooks, d_model], normalised to the stored form
        self.tensor = self.tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if self.tensor.shape != (len(self.hooks), self.d_model):
            raise ValueError(
                f"tensor shape {tuple(self.tensor.shape)} does not match [len(hooks)={len(self.hooks)}, "
                f"d_model={self.d_model}]"
            )
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"duplicate hook names in {self.hooks}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown record kind {self.kind!r}; expected one of {KINDS}")

    def vector_for(self, hook: str) -> torch.Tensor:
        """The row for `hook`: [d_model]. KeyError if the record has no such hook."""
        try:
            row = self.hooks.index(hook)
        except ValueError:
            raise KeyError(f"vector {self.id} has no row for hook {hook!r} (has {list(self.hooks)})") from None
        return self.tensor[row]  # [d_model]

    def metadata(self) -> dict[str, Any]:
        """Every field except the tensor, JSON-safe."""
        return {
            "id": self.id,
            "model": self.model,
            "d_model": self.d_model,
            "hooks": list(self.hooks),
            "method": self.method,
            "n_pairs": self.n_pairs,
            "created": self.created,
            "name": self.name,
            "description": self.description,
            "separation": list(self.separation),
            "owner": self.owner,
            "public": self.public,
            "kind": self.kind,
            "extra": self.extra,
        }

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensor under "vector", metadata JSON (with the tensor's sha256) under "interpgw"."""
        meta = {"format": FORMAT_VERSION, "sha256": _digest(self.tensor), **self.metadata()}
        return st_save({TENSOR_KEY: self.tensor}, metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> VectorRecord:
        """Parse `to_bytes` output; CorruptRecord on truncation, parse failure or checksum mismatch."""
        try:
            meta = _read_metadata(data)
            tensors = st_load(bytes(data))
        except CorruptRecord:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError, among others
            raise CorruptRecord(f"unreadable vector record: {exc}") from exc
        if set(tensors) != {TENSOR_KEY}:
            raise CorruptRecord(f"vector record holds tensors {sorted(tensors)}, expected [{TENSOR_KEY!r}]")
        tensor = tensors[TENSOR_KEY]  # [n_hooks, d_model]
        if tensor.dtype != torch.float32 or tensor.dim() != 2:
            raise CorruptRecord(f"vector record tensor is {tensor.dtype} {tuple(tensor.shape)}, expected 2-D float32")
        tensor = tensor.contiguous()
        if meta.get("format") != FORMAT_VERSION:
            raise CorruptRecord(f"unsupported vector record format {meta.get('format')!r}")
        if meta.get("sha256") != _digest(tensor):
            raise CorruptRecord(f"vector record {meta.get('id')!r}: tensor checksum mismatch")
        names = {f.name for f in fields(cls)} - {"tensor"}
        meta.setdefault("kind", "vector")  # records written before probes existed
        meta.setdefault("extra", {})
        meta.setdefault("public", False)  # records written before tenancy existed
        missing = names - set(meta)
        if missing:
            raise CorruptRecord(f"vector record metadata lacks {sorted(missing)}")
        try:
            record = cls(tensor=tensor, **{name: meta[name] for name in names})
        except (TypeError, ValueError) as exc:
            raise CorruptRecord(f"vector record {meta.get('id')!r}: inconsistent metadata: {exc}") from exc
        _check_types(record)
        return record

    def __eq__(self, other: object) -> bool:
        """Field-wise equality; tensors must be bit-identical (NaN payloads included)."""
        if not isinstance(other, VectorRecord):
            return NotImplemented
        return (
            self.metadata() == other.metadata()
            and self.tensor.shape == other.tensor.shape
            and torch.equal(self.tensor.view(torch.int32), other.tensor.view(torch.int32))
        )


def _read_metadata(data: bytes) -> dict[str, Any]:
    """The "interpgw" JSON object from a safetensors header (safetensors' `load` does not return metadata)."""
    if len(data) < 8:
        raise CorruptRecord(f"vector record truncated: {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptRecord(f"vector record truncated: header of {header_len} bytes, {len(data) - 8} present")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"vector record header unreadable: {exc!r}") from exc
    if not isinstance(meta, dict):
        raise CorruptRecord("vector record metadata is not a JSON object")
    return meta


def _check_types(record: VectorRecord) -> None:
    """Reject metadata whose JSON types are wrong (hand-edited or foreign values)."""
    ok = (
        all(isinstance(v, str) for v in (record.id, record.model, record.method, record.name, record.description))
        and isinstance(record.owner, str)
        and isinstance(record.public, bool)
        and isinstance(record.kind, str)
        and isinstance(record.extra, dict)
        and all(isinstance(h, str) for h in record.hooks)
        and isinstance(record.d_model, int)
        and isinstance(record.n_pairs, int)
        and isinstance(record.created, int | float)
    )
    if not ok:
        raise CorruptRecord(f"vector record {record.id!r}: metadata field of the wrong type")
