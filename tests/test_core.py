"""Fast unit tests of the core and SDK pieces that need no engine and no server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from interpgw.core.capture import HookOrder, estimate_capture_bytes
from interpgw.core.errors import InvalidArgument
from interpgw.core.hookpoints import all_hook_names, parse_hook, parse_hooks
from interpgw.core.positions import PositionMode, PositionSelector
from interpgw.core.requests import Captured
from interpgw.core.wire import tensor_chunks
from interpgw.transport.chunks import encoded_tensor_messages, serializer
from interpgw.v1 import gateway_pb2 as pb
from interpgw_client import errors as client_errors
from interpgw_client.chunks import ReceivedChunk, response_deserializer
from interpgw_client.protocol import TensorAssembler, build_positions, build_prompt, build_trace
from interpgw_client.tensors import to_numpy


def test_hook_names_follow_transformer_lens_and_accept_negative_layers() -> None:
    names = all_hook_names(2)
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    assert len(names) == 2 + 2 * 5
    assert parse_hook("blocks.-1.hook_resid_post", 2).name == "blocks.1.hook_resid_post"
    assert [
        h.name
        for h in parse_hooks(
            ["ln_final.hook_normalized", "blocks.1.hook_mlp_out", "blocks.-1.hook_mlp_out", "hook_embed"], 2
        )
    ] == ["hook_embed", "blocks.1.hook_mlp_out", "ln_final.hook_normalized"]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("blocks.2.hook_resid_post", "L must be in [-2, 1]"),
        ("blocks.-3.hook_resid_post", "L must be in [-2, 1]"),
        ("blocks.0.hook_attn_pattern", "valid kinds: hook_resid_pre, hook_attn_out"),
        ("resid_post", "valid hook points: hook_embed"),
    ],
)
def test_bad_hook_names_name_the_valid_choices(name: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_hook(name, 2)


def test_position_selectors_resolve_and_validate() -> None:
    assert PositionSelector().resolve(3) == [0, 1, 2]
    assert PositionSelector(PositionMode.LAST).resolve(3) == [2]
    assert PositionSelector(PositionMode.NONE).resolve(3) == []
    assert PositionSelector(PositionMode.INDICES, (-1, 0, 2, -3)).resolve(3) == [0, 2]
    with pytest.raises(InvalidArgument, match=r"valid indices are \[-3, 2\]"):
        PositionSelector(PositionMode.INDICES, (3,)).resolve(3)
    with pytest.raises(InvalidArgument, match="at least one index"):
        PositionSelector(PositionMode.INDICES, ()).resolve(3)


def test_capture_order_round_trips_and_estimates_bytes() -> None:
    order = HookOrder("k", ("hook_embed", "blocks.0.hook_resid_post"), 10, (1, 4), True, "float32")
    assert HookOrder.from_extra_args(order.to_extra_args()) == order
    # 2 prompt rows + at most 4 generated rows (max_tokens 5), 2 hooks, d_model 8, 4 bytes
    assert estimate_capture_bytes(order, 8, "bfloat16", 5) == 6 * 2 * 8 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_chunks_reassemble_exactly(dtype: torch.dtype) -> None:
    tensor = torch.randn(37, 19).to(dtype)
    chunks = list(tensor_chunks(tensor, chunk_bytes=100))
    assert all(len(c.data) <= 100 for c in chunks) and len(chunks) == -(-tensor.numel() * tensor.element_size() // 100)
    assembler = TensorAssembler(as_torch=True)
    for chunk in chunks:
        assembler.add(
            pb.TensorChunk(
                prompt_index=0,
                hook="h",
                dtype=chunk.dtype,
                shape=chunk.shape,
                offset=chunk.offset,
                total_bytes=chunk.total_bytes,
                data=bytes(chunk.data),
            )
        )
    assert torch.equal(assembler.tensors(0)["h"], tensor)


@pytest.mark.parametrize("response_cls", [pb.TraceResponse, pb.GenerateResponse])
def test_hand_encoded_chunks_parse_as_the_messages_protobuf_would_build(response_cls: type) -> None:
    # bf16 and fp32, an empty tensor, a tensor over the chunk size; lengths whose varints take 1, 2 and 3 bytes
    captured = Captured(
        positions=[0, 1, 2],
        tensors={
            "blocks.0.hook_resid_post": torch.randn(3, 8000).to(torch.bfloat16),  # 48000 bytes: 20000 + 20000 + 8000
            "hook_embed": torch.randn(3, 5),  # 60 bytes
            "ln_final.hook_normalized": torch.empty(0, 5),
            "blocks.1.hook_attn_out": torch.randn(3, 100),  # 1200 bytes
        },
    )
    encoded = list(encoded_tensor_messages(response_cls, 7, captured, chunk_bytes=20000))
    expected = []
    for hook, tensor in captured.tensors.items():
        for chunk in tensor_chunks(tensor, 20000):
            message = response_cls()
            message.tensor.CopyFrom(
                pb.TensorChunk(
                    prompt_index=7,
                    hook=hook,
                    dtype=chunk.dtype,
                    shape=chunk.shape,
                    offset=chunk.offset,
                    total_bytes=chunk.total_bytes,
                    data=bytes(chunk.data),
                )
            )
            expected.append(message)
    assert len(encoded) == len(expected) == 3 + 1 + 1 + 1
    for item, message in zip(encoded, expected, strict=True):
        parsed = response_cls.FromString(item.payload)
        assert parsed == message and parsed.WhichOneof("event") == "tensor"
        assert item.data_bytes == len(message.tensor.data) and item.first == (message.tensor.offset == 0)
    # what the gateway sends: encoded chunks as they are, every other message through protobuf
    serialize = serializer(response_cls)
    assert serialize(encoded[0]) is encoded[0].payload
    assert serialize(expected[0]) == expected[0].SerializeToString()
    # the SDK reads chunks out of the received bytes, whether hand-encoded or serialized by protobuf
    deserialize = response_deserializer(response_cls)
    assemblers = TensorAssembler(as_torch=True), TensorAssembler(as_torch=True)
    for item, message in zip(encoded, expected, strict=True):
        for assembler, raw in zip(assemblers, (item.payload, message.SerializeToString()), strict=True):
            chunk = deserialize(raw)
            assert isinstance(chunk, ReceivedChunk) and bytes(chunk.data) == message.tensor.data
            assert (chunk.header.hook, list(chunk.header.shape), chunk.header.offset) == (
                message.tensor.hook,
                message.tensor.shape,
                message.tensor.offset,
            )
            assembler.add(chunk)
    for assembler in assemblers:
        decoded = assembler.tensors(7)
        assert all(torch.equal(decoded[h], t) for h, t in captured.tensors.items())


def test_the_sdk_parses_every_other_response_with_protobuf() -> None:
    deserialize = response_deserializer(pb.TraceResponse)
    prompt = pb.TraceResponse(prompt=pb.TracePromptResult(prompt_index=2, token_ids=[5, 6]))
    assert deserialize(prompt.SerializeToString()) == prompt
    assert deserialize(b"") == pb.TraceResponse()
    chunk = pb.TensorChunk(hook="hook_embed", dtype="float32", shape=[1, 1], total_bytes=4, data=b"abcd")
    trailing = pb.TraceResponse(tensor=chunk).SerializeToString() + prompt.SerializeToString()
    assert deserialize(trailing) == pb.TraceResponse.FromString(trailing)  # not one bare chunk: protobuf decides
    damaged = pb.TraceResponse(tensor=chunk).SerializeToString()[:-2]
    with pytest.raises(DecodeError):
        deserialize(damaged)


def test_empty_tensor_is_one_empty_chunk() -> None:
    chunks = list(tensor_chunks(torch.empty(0, 4)))
    assert len(chunks) == 1 and chunks[0].data == b"" and chunks[0].shape == (0, 4)


def test_bfloat16_decodes_to_exact_float32_in_numpy() -> None:
    values = torch.tensor([[1.5, -2.25], [3e38, 1e-30]]).to(torch.bfloat16)
    raw = values.view(torch.uint16).numpy().tobytes()
    decoded = to_numpy("bfloat16", (2, 2), raw)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, values.float().numpy())


def test_sdk_builds_prompts_and_positions() -> None:
    assert build_prompt("hi").text == "hi"
    assert list(build_prompt([1, 2]).tokens.ids) == [1, 2]
    chat = build_prompt([{"role": "user", "content": "hi"}]).chat
    assert chat.messages[0].role == "user" and chat.add_generation_prompt
    assert build_positions("last").mode == pb.PositionSelector.LAST
    assert list(build_positions([-1, 2]).indices) == [-1, 2]
    with pytest.raises(ValueError, match="positions must be one of"):
        build_positions("first")
    request = build_trace(
        "one prompt", model="", hooks="hook_embed", positions=-1, dtype="", top_k=0, add_generation_prompt=True
    )
    assert len(request.prompts) == 1 and list(request.capture.hooks) == ["hook_embed"]


def test_rpc_errors_map_to_typed_exceptions() -> None:
    class FakeRpcError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return "too big"

    error = client_errors.from_rpc_error(FakeRpcError())
    assert isinstance(error, client_errors.ResourceExhaustedError) and error.details == "too big"


class CancelledRpcError(grpc.RpcError):
    def __init__(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return self._details


def test_a_call_cancelled_by_a_shutting_down_server_is_unavailable_and_the_clients_own_cancel_is_not() -> None:
    """grpc/grpc#41785: a call that reached a server as it shut down gets CANCELLED with details "CANCELLED"
    (seen in tests/test_lifecycle.py's drain test); it never ran, so it is UNAVAILABLE to the SDK's callers."""
    shutdown = client_errors.from_rpc_error(CancelledRpcError("CANCELLED"))
    assert isinstance(shutdown, client_errors.UnavailableError) and "shut down" in shutdown.details
    for own in ("Locally cancelled by application!", "Channel closed!"):
        assert isinstance(client_errors.from_rpc_error(CancelledRpcError(own)), client_errors.CancelledError)
