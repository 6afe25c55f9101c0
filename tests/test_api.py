"""End to end through a real gateway process and the SDK: API behaviour, bad input, isolation, CLI, docs."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway_process import run_cli
from interpgw.core.wire import CHUNK_BYTES
from interpgw.v1 import gateway_pb2 as pb
from interpgw.v1 import gateway_pb2_grpc as pb_grpc
from interpgw_client import (
    AsyncClient,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from reference import hf_activations, scaled_max_diff

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


def test_models_and_model_info(client) -> None:  # noqa: ANN001
    (info,) = client.models()
    assert (info.id, info.architecture, info.n_layers, info.d_model) == (
        "SmolLM2-135M-Instruct",
        "LlamaForCausalLM",
        30,
        576,
    )
    assert (info.vocab_size, info.dtype, info.max_model_len) == (49152, "float32", 2048)
    assert len(info.hook_points) == 2 + 30 * 5 and "blocks.29.hook_resid_post" in info.hook_points
    assert client.model_info("SmolLM2-135M-Instruct") == info
    with pytest.raises(InvalidArgumentError, match="unknown model 'gpt-9'; served models: SmolLM2-135M-Instruct"):
        client.model_info("gpt-9")
    with pytest.raises(InvalidArgumentError, match="unknown model 'gpt-9'"):
        client.trace("x", model="gpt-9")


def test_generate_streams_tokens(client) -> None:  # noqa: ANN001
    stream = client.generate_stream("The capital of France is", max_tokens=12, temperature=0)
    events = list(stream)
    result = stream.result
    assert "Paris" in result.text
    assert "".join(e.text for e in events) == result.text
    assert [i for e in events for i in e.token_ids] == result.token_ids
    assert [e.index for e in events] == sorted(e.index for e in events)
    assert result.finish_reason in ("length", "stop") and len(result.token_ids) <= 12


def test_sampling_parameters(client) -> None:  # noqa: ANN001
    prompt = "Once upon a time"
    a = client.generate(prompt, max_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    b = client.generate(prompt, max_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    assert a.token_ids == b.token_ids, "same seed, same tokens"
    others = {tuple(client.generate(prompt, max_tokens=16, temperature=1.0, seed=s).token_ids) for s in range(4)}
    assert len(others) > 1, "different seeds should sample differently"
    stopped = client.generate("Count: 1, 2, 3,", max_tokens=30, temperature=0, stop=[","])
    assert stopped.finish_reason == "stop" and "," not in stopped.text
    long = client.generate("Hi", max_tokens=20, temperature=0, ignore_eos=True)
    assert len(long.token_ids) == 20


def test_seeded_sampling_survives_chunked_prefill_and_repeats(tiny_gateway) -> None:  # noqa: ANN001
    """Seeded requests whose prompts are prefilled in chunks (tiny server: 32 tokens per step), several at once.
    Unpatched vLLM CPU kills its engine here (engine/cpu_seed_fix.py); with the fix each seed gives the same
    tokens whether its request runs alone or beside others."""
    prompts = [f"Number {i}: " + "the quick brown fox jumps over the lazy dog " * (3 + i) for i in range(4)]

    async def run(batch: list[int]) -> list[list[int]]:
        async with AsyncClient(tiny_gateway.address, timeout=300) as client:
            results = await asyncio.gather(
                *(
                    client.generate(prompts[i], max_tokens=8, temperature=1.0, seed=100 + i, ignore_eos=True)
                    for i in batch
                )
            )
            return [r.token_ids for r in results]

    together = asyncio.run(run([0, 1, 2, 3]))
    alone = [asyncio.run(run([i]))[0] for i in range(4)]
    assert together == alone
    assert len({tuple(t) for t in together}) == 4


def test_chat_prompt(client) -> None:  # noqa: ANN001
    result = client.generate(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0
    )
    assert "Paris" in result.text
    assert result.prompt_token_ids[0] == 1, "SmolLM2's template starts with <|im_start|>"


def test_async_client(default_gateway) -> None:  # noqa: ANN001
    async def main():  # noqa: ANN202
        async with AsyncClient(default_gateway.address, timeout=120) as aclient:
            await aclient.wait_ready()
            stream = aclient.generate_stream("The capital of France is", max_tokens=6, temperature=0)
            texts = [event.text async for event in stream]
            trace = await aclient.trace(["a b c", "d e"], "blocks.0.hook_resid_post", positions="last")
            info = await aclient.model_info()
            return texts, stream.result, trace, info

    texts, result, trace, info = asyncio.run(main())
    assert "".join(texts) == result.text and len(result.token_ids) == 6
    assert [t.activations["blocks.0.hook_resid_post"].shape for t in trace] == [(1, info.d_model)] * 2


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.trace("x", "blocks.30.hook_resid_post"), r"L must be in \[-30, 29\]"),
        (lambda c: c.trace("x", "blocks.0.hook_attn_pattern"), "valid kinds: hook_resid_pre"),
        (lambda c: c.trace("x", "resid"), "valid hook points: hook_embed"),
        (lambda c: c.trace("", "hook_embed"), "prompt text is empty"),
        (lambda c: c.trace([], "hook_embed"), "at least one prompt"),
        (lambda c: c.trace("hello world", "hook_embed", positions=[5]), "valid indices are"),
        (lambda c: c.trace("word " * 2100, "hook_embed"), "context is 2048 tokens"),
        (lambda c: c.trace([1, 2, 10**6], "hook_embed"), r"valid ids are \[0, 49151\]"),
        (lambda c: c.generate("x", max_tokens=5000), "max_tokens must be in"),
        (lambda c: c.generate("x", temperature=-1.0), "temperature"),
        (lambda c: c.generate("x", capture="hook_embed", capture_dtype="int4"), "valid: '' \\(model dtype\\)"),
        (lambda c: c.trace("x", top_k=50), r"top_k_logits must be in \[0, 20\]"),
    ],
)
def test_bad_input_is_invalid_argument_naming_valid_choices(client, call, fragment: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgumentError, match=fragment):
        call(client)


def test_oversized_capture_is_resource_exhausted(client) -> None:  # noqa: ANN001
    info = client.model_info()
    with pytest.raises(ResourceExhaustedError, match="limit is 268,435,456 bytes"):
        client.trace("word " * 1000, info.hook_points)  # 152 hooks x 1000 tokens x 576 x 4 bytes = 350 MB


def test_a_failing_hook_fails_only_its_request(default_gateway) -> None:  # noqa: ANN001
    """Fault injection (enabled on this test server only) raises inside the hook of one request."""
    hooks = ["blocks.3.hook_resid_post", "blocks.20.hook_mlp_out"]
    prompts = [f"Request number {i} is about {'cats ' * i}" for i in range(8)]

    async def main():  # noqa: ANN202
        async with AsyncClient(default_gateway.address, as_torch=True, timeout=120) as aclient:
            solo = [await aclient.generate(p, max_tokens=6, temperature=0, capture=hooks) for p in prompts]
            calls = [aclient.generate(p, max_tokens=6, temperature=0, capture=hooks) for p in prompts]
            calls.append(
                aclient.generate(
                    "doomed", max_tokens=6, temperature=0, capture=hooks, metadata=[("x-interpgw-fault", "hook")]
                )
            )
            together = await asyncio.gather(*calls, return_exceptions=True)
            after = await aclient.generate(prompts[0], max_tokens=6, temperature=0, capture=hooks)
            return solo, together, after

    solo, together, after = asyncio.run(main())
    assert isinstance(together[-1], InternalError) and "fault injected" in str(together[-1])
    for alone, batched in zip(solo, together[:-1], strict=True):
        assert not isinstance(batched, Exception), batched
        assert batched.token_ids == alone.token_ids
        for hook in hooks:
            assert scaled_max_diff(batched.activations[hook], alone.activations[hook]) < 1e-4
    assert after.token_ids == solo[0].token_ids


def test_large_tensors_are_streamed_in_chunks_under_4_mib(default_gateway, hf_default) -> None:  # noqa: ANN001
    channel = grpc.insecure_channel(default_gateway.address, options=[("grpc.max_receive_message_length", 4 * 2**20)])
    stub = pb_grpc.GatewayStub(channel)
    request = pb.TraceRequest(
        prompts=[pb.Prompt(text="word " * 1900)], capture=pb.CaptureSpec(hooks=["blocks.12.hook_resid_post"])
    )
    messages = list(stub.Trace(request, timeout=300))
    channel.close()
    chunks = [m.tensor for m in messages if m.WhichOneof("event") == "tensor"]
    (prompt,) = [m.prompt for m in messages if m.WhichOneof("event") == "prompt"]
    assert len(chunks) >= 2 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert all(m.ByteSize() < 4 * 2**20 for m in messages)
    data = b"".join(c.data for c in sorted(chunks, key=lambda c: c.offset))
    assert len(data) == chunks[0].total_bytes == len(prompt.token_ids) * 576 * 4
    tensor = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(list(chunks[0].shape))
    expected = hf_activations(hf_default, list(prompt.token_ids))["blocks.12.hook_resid_post"]
    # A mis-assembled chunk would be off by O(1). fp32 noise on this 1,900-token repetitive prompt depends on
    # the CPU's kernels: 5e-6 on an Intel (AMX) machine, 1.2e-4 at one position on an AMD EPYC (AVX-512) one.
    assert scaled_max_diff(tensor, expected) < 5e-4


def test_cancelled_stream_leaves_the_server_healthy(client) -> None:  # noqa: ANN001
    stream = client.generate_stream(
        "Tell me a long story",
        max_tokens=200,
        temperature=0,
        ignore_eos=True,
        capture="blocks.1.hook_resid_post",
        capture_generated=True,
    )
    iterator = iter(stream)
    next(iterator)
    stream.cancel()
    with pytest.raises(Exception, match="CANCELLED"):
        list(iterator)
    assert len(client.generate("Hi", max_tokens=3, temperature=0).token_ids) == 3


def test_health_and_reflection(default_gateway) -> None:  # noqa: ANN001
    with grpc.insecure_channel(default_gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "interpgw.v1.Gateway"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in response.list_services_response.service}
        assert {"interpgw.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_cli_generate_and_trace(default_gateway) -> None:  # noqa: ANN001
    out = run_cli(
        default_gateway.address, "generate", "The capital of France is", "--max-tokens", "6", "--temperature", "0"
    )
    assert out.returncode == 0 and "Paris" in out.stdout, out.stderr
    out = run_cli(
        default_gateway.address,
        "trace",
        "The capital of France is",
        "--hook",
        "blocks.-1.hook_resid_post",
        "--positions",
        "last",
    )
    assert out.returncode == 0, out.stderr
    assert "blocks.29.hook_resid_post: shape [1, 576]" in out.stdout and "next token:" in out.stdout
    out = run_cli(default_gateway.address, "trace", "x", "--hook", "blocks.99.hook_resid_post")
    assert out.returncode == 1 and "L must be in [-30, 29]" in out.stderr
    out = run_cli(default_gateway.address, "trace", "x", "--positions", "last,-2")
    assert out.returncode == 2 and "positions must be" in out.stderr


def test_readme_example_runs(default_gateway) -> None:  # noqa: ANN001
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert len(example.strip().splitlines()) == 5
    code = example.replace('"localhost:50051"', repr(default_gateway.address))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "(1, 576)" in out.stdout


def test_readme_steering_example_runs(default_gateway) -> None:  # noqa: ANN001
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    steering = next(b for b in blocks if "client.steering.train" in b)
    check = "\nprint(out.text != out.baseline.text, grid.restored.shape)\n"
    code = (blocks[0] + steering + check).replace('"localhost:50051"', repr(default_gateway.address))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "True (30, 8)" in out.stdout, out.stdout


def test_readme_signals_example_runs(default_gateway) -> None:  # noqa: ANN001
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    signals = next(b for b in blocks if "client.probes.train" in b)
    check = "\nprint(len(out.signals) == len(out.token_ids), out.signals[0].probe_ids == [probe.id], '<span' in html)\n"
    code = (blocks[0] + signals + check).replace('"localhost:50051"', repr(default_gateway.address))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "True True True" in out.stdout, out.stdout
