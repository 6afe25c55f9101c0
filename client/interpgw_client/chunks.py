"""Tensor chunks read straight out of the received message bytes.

Parsed the ordinary way, a chunk's bytes are copied by protobuf's parser into the message, copied again into a new
`bytes` each time `.data` is read, and once more by the assembler: for a 45 MiB trace about 40 ms of copying in the
client here, on the critical path of every large trace (docs/benchmarks.md, activation cache).

This deserializer finds the `tensor` field of a Trace/Generate response and the chunk's `data` field in the received
bytes by protobuf's public wire format, lets protobuf parse the chunk's other (small) fields, and hands the data on
as a view of the received bytes: the assembler's append is then the only copy. Every other message, and anything
this reader does not expect, is parsed by protobuf as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from interpgw.v1 import gateway_pb2 as pb
from interpgw.v1 import gateway_pb2_grpc as pb_grpc

_LENGTH_DELIMITED = 2
_DATA_FIELD = pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number


@dataclass(frozen=True, slots=True)
class ReceivedChunk:
    """A TensorChunk whose data is a view of the message bytes it arrived in."""

    header: pb.TensorChunk  # every field but `data`
    data: memoryview


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); IndexError past the end, ValueError if longer than 10 bytes."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _field_end(buf: memoryview, pos: int, wire_type: int) -> tuple[int, int]:
    """(start of the value's payload, end of the field) for the field whose value starts at `pos`."""
    if wire_type == 0:
        return pos, _varint(buf, pos)[1]
    if wire_type == 1:
        return pos, pos + 8
    if wire_type == _LENGTH_DELIMITED:
        length, start = _varint(buf, pos)
        return start, start + length
    if wire_type == 5:
        return pos, pos + 4
    raise ValueError(f"wire type {wire_type}")


def _read_chunk(raw: bytes, tensor_field: int) -> ReceivedChunk | None:
    """The chunk if `raw` is exactly one `tensor` field holding a TensorChunk; None for anything else."""
    buf = memoryview(raw)
    tag, pos = _varint(buf, 0)
    if tag != (tensor_field << 3 | _LENGTH_DELIMITED):
        return None
    start, end = _field_end(buf, pos, _LENGTH_DELIMITED)
    if end != len(buf):
        return None
    header, data = [], buf[0:0]
    pos = start
    while pos < end:
        tag, value_pos = _varint(buf, pos)
        payload, field_end = _field_end(buf, value_pos, tag & 7)
        if field_end > end:
            return None
        if tag == (_DATA_FIELD << 3 | _LENGTH_DELIMITED):
            data = buf[payload:field_end]  # the last occurrence wins, as in protobuf
        else:
            header.append(buf[pos:field_end])
        pos = field_end
    return ReceivedChunk(header=pb.TensorChunk.FromString(b"".join(header)), data=data)


def response_deserializer(response_cls: Any) -> Callable[[bytes], Any]:
    """Deserializer for a response with a `tensor` oneof member: a `ReceivedChunk` for tensor chunks, else a message."""
    tensor_field = response_cls.DESCRIPTOR.fields_by_name["tensor"].number
    parse = response_cls.FromString

    def deserialize(raw: bytes) -> Any:
        try:
            chunk = _read_chunk(raw, tensor_field)
        except (IndexError, ValueError):
            chunk = None  # not what the gateway sends: protobuf's own parser decides (and raises if it must)
        return chunk if chunk is not None else parse(raw)

    return deserialize


def gateway_stub(channel: Any) -> pb_grpc.GatewayStub:
    """The generated stub on `channel` (sync or asyncio), with the streaming methods that carry tensor chunks
    deserialized by `response_deserializer`."""
    stub = pb_grpc.GatewayStub(channel)
    for method, request_cls, response_cls in (
        ("Generate", pb.GenerateRequest, pb.GenerateResponse),
        ("Trace", pb.TraceRequest, pb.TraceResponse),
        ("GetTrace", pb.GetTraceRequest, pb.TraceResponse),
    ):
        multicallable = channel.unary_stream(
            f"/{pb.DESCRIPTOR.services_by_name['Gateway'].full_name}/{method}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_deserializer(response_cls),
            _registered_method=True,
        )
        setattr(stub, method, multicallable)
    return stub
