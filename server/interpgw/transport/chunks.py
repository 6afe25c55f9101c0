"""Tensor chunks written straight into protobuf wire format, with the tensor's bytes copied once.

Building a chunk the ordinary way copies its bytes four times before gRPC sees them: tensor memory → `bytes`
(protobuf refuses a memoryview), → the `TensorChunk` message, → the `TraceResponse` holding it, → the serialized
string. A 45 MiB trace (30 tensors) is 45 MiB of freshly allocated memory per copy, about 10 ms each on the
2-core machines here, most of a cache hit's time once the entry is read (docs/benchmarks.md, activation cache).

Protobuf's encoding of a length-delimited field is public and stable (tag, varint length, bytes), so each
response is written here as: the outer message's `tensor` field tag and length, the chunk's small fields
serialized by protobuf itself, then the `data` field's tag and length and the tensor's bytes, joined in one copy
from the tensor's own memory. A parser cannot tell the result from `SerializeToString` output (tests check that
it parses to the same message). The gateway's response serializer (`serializer`) passes an `EncodedChunk`
through and serializes every other message as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from interpgw.core.requests import Captured
from interpgw.core.wire import CHUNK_BYTES, tensor_chunks
from interpgw.v1 import gateway_pb2 as pb

_LENGTH_DELIMITED = 2  # protobuf wire type of bytes, strings and embedded messages


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field_number: int) -> bytes:
    return _varint(field_number << 3 | _LENGTH_DELIMITED)


_DATA_TAG = _tag(pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number)


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """One response message (a TraceResponse or GenerateResponse whose `tensor` is set), already serialized."""

    payload: bytes
    data_bytes: int  # the tensor bytes it carries
    first: bool  # the tensor's first chunk (offset 0): the metrics count a captured tensor there


def encoded_tensor_messages(
    response_cls: Any, prompt_index: int, captured: Captured, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[EncodedChunk]:
    """Every captured tensor as `response_cls(tensor=TensorChunk(...))` messages in wire format, in order."""
    outer_tag = _tag(response_cls.DESCRIPTOR.fields_by_name["tensor"].number)
    for hook, tensor in captured.tensors.items():
        for chunk in tensor_chunks(tensor, chunk_bytes):
            head = pb.TensorChunk(
                prompt_index=prompt_index,
                hook=hook,
                dtype=chunk.dtype,
                shape=chunk.shape,
                offset=chunk.offset,
                total_bytes=chunk.total_bytes,
            ).SerializeToString()
            data_head = _DATA_TAG + _varint(len(chunk.data))
            length = len(head) + len(data_head) + len(chunk.data)
            payload = b"".join((outer_tag, _varint(length), head, data_head, chunk.data))  # the one copy
            yield EncodedChunk(payload=payload, data_bytes=len(chunk.data), first=chunk.offset == 0)


def serializer(response_cls: Any) -> Callable[[Any], bytes]:
    """The gRPC response serializer for `response_cls`: an `EncodedChunk` is sent as it is."""
    serialize = response_cls.SerializeToString

    def serialize_response(message: Any) -> bytes:
        if isinstance(message, EncodedChunk):
            return message.payload
        return serialize(message)

    return serialize_response
