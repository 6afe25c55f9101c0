"""Activations captured through the gateway equal a Hugging Face forward of the same weights (fp32).

Runs against real gateway processes (vLLM engines) for the default model and a tiny random Llama. The
default server's step budget is 64 tokens and the tiny one's 32, so every prompt longer than that is
prefilled in chunks; prefix caching is on for both.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from interpgw_client import AsyncClient
from reference import hf_activations, scaled_max_diff

pytestmark = pytest.mark.engine

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The mitochondria is the powerhouse of the cell.",
    "Shakespeare wrote Hamlet, Macbeth and many other plays.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The Great Wall of China is visible from many places along its length.",
]


def varied_prompts(n: int) -> list[str]:
    """n prompts of clearly different lengths (about 10 to 200 tokens)."""
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + (i * 7) % 17)) for i in range(n)]


@pytest.fixture(params=["default", "tiny"])
def target(request: pytest.FixtureRequest):
    """(client, hf model, difference measure, address) for each model under test."""
    if request.param == "default":
        client, hf = request.getfixturevalue("client"), request.getfixturevalue("hf_default")
        address = request.getfixturevalue("default_gateway").address

        def close(actual: torch.Tensor, expected: torch.Tensor) -> float:
            return scaled_max_diff(actual, expected)
    else:
        client, hf = request.getfixturevalue("tiny_client"), request.getfixturevalue("hf_tiny")
        address = request.getfixturevalue("tiny_gateway").address

        def close(actual: torch.Tensor, expected: torch.Tensor) -> float:
            return float((actual - expected).abs().max())  # plain absolute difference

    return client, hf, close, address


def subset_hooks(n_layers: int) -> list[str]:
    hooks = ["hook_embed", "ln_final.hook_normalized"]
    for layer in (0, n_layers // 2, n_layers - 1):
        hooks += [f"blocks.{layer}.hook_{k}" for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")]
    return hooks


def assert_matches(trace_acts: dict, reference: dict, close, rows=None, tol: float = 1e-4) -> None:  # noqa: ANN001
    assert trace_acts, "nothing captured"
    for hook, actual in trace_acts.items():
        expected = reference[hook] if rows is None else reference[hook][rows]
        assert tuple(actual.shape) == tuple(expected.shape), hook
        assert actual.dtype == torch.float32
        diff = close(actual, expected)
        assert diff < tol, f"{hook}: max diff {diff:.3g}"


def test_every_hook_point_matches_hf(target) -> None:  # noqa: ANN001
    client, hf, close, _ = target
    info = client.model_info()
    result = client.trace(varied_prompts(3)[2], info.hook_points)
    trace = result[0]
    n = len(trace.token_ids)
    assert trace.positions == list(range(n))
    assert set(trace.activations) == set(info.hook_points)
    assert_matches(trace.activations, hf_activations(hf, trace.token_ids), close)


def test_sixteen_concurrent_requests_match_their_single_runs(target) -> None:  # noqa: ANN001
    client, hf, close, address = target
    info = client.model_info()
    hooks = subset_hooks(info.n_layers)
    prompts = varied_prompts(16)
    singles = [client.trace(p, hooks)[0] for p in prompts]
    lengths = sorted(len(s.token_ids) for s in singles)
    assert len(set(lengths)) >= 8 and lengths[-1] > 64, f"prompts should vary and be chunked: {lengths}"

    async def concurrently():
        async with AsyncClient(address, as_torch=True, timeout=300) as aclient:
            return await asyncio.gather(*(aclient.trace(p, hooks) for p in prompts))

    together = [r[0] for r in asyncio.run(concurrently())]
    batched = client.trace(prompts, hooks)  # one RPC with all 16 prompts
    for single, concurrent, in_batch in zip(singles, together, batched.prompts, strict=True):
        assert concurrent.token_ids == single.token_ids == in_batch.token_ids
        assert concurrent.positions == single.positions == list(range(len(single.token_ids)))
        assert_matches(concurrent.activations, single.activations, close)
        assert_matches(in_batch.activations, single.activations, close)
    for single in singles[:4]:
        assert_matches(single.activations, hf_activations(hf, single.token_ids), close)


def test_prefix_cache_hit_still_captures_every_position(target) -> None:  # noqa: ANN001
    client, hf, close, _ = target
    prompt = " ".join(SENTENCES * 4)  # ~300 tokens: several KV blocks, chunked prefill
    first = client.generate(prompt, max_tokens=2, temperature=0)
    second = client.generate(prompt, max_tokens=2, temperature=0)
    assert second.cached_prompt_tokens > 0, "the plain repeat should hit the prefix cache"
    assert second.token_ids == first.token_ids
    hooks = subset_hooks(client.model_info().n_layers)
    trace = client.trace(prompt, hooks)[0]
    assert trace.positions == list(range(len(first.prompt_token_ids)))
    assert_matches(trace.activations, hf_activations(hf, trace.token_ids), close)
    captured = client.generate(prompt, max_tokens=2, temperature=0, capture=hooks, capture_generated=True)
    assert captured.token_ids == first.token_ids
    assert captured.positions == list(range(len(first.prompt_token_ids) + 1))
    assert_matches({h: a[:-1] for h, a in captured.activations.items()}, trace.activations, close)


def test_generated_positions_match_teacher_forced_hf(target) -> None:  # noqa: ANN001
    client, hf, close, _ = target
    hooks = ["blocks.-1.hook_resid_post", "blocks.0.hook_attn_out", "ln_final.hook_normalized"]
    result = client.generate(
        SENTENCES[1], max_tokens=8, temperature=0, capture=hooks, positions="last", capture_generated=True
    )
    n_prompt, n_out = len(result.prompt_token_ids), len(result.token_ids)
    assert n_out == 8
    # the last sampled token is never fed through the model, so it has no activations
    assert result.positions == list(range(n_prompt - 1, n_prompt + n_out - 1))
    full = result.prompt_token_ids + result.token_ids[:-1]
    reference = hf_activations(hf, full)
    reference["blocks.-1.hook_resid_post"] = reference[f"blocks.{hf.config.num_hidden_layers - 1}.hook_resid_post"]
    assert_matches(result.activations, reference, close, rows=result.positions)
    greedy = reference["logits"][n_prompt - 1 :].argmax(-1).tolist()
    assert result.token_ids == greedy, "greedy tokens differ from HF's argmax under teacher forcing"


def test_position_selectors(target) -> None:  # noqa: ANN001
    client, hf, close, _ = target
    hook = "blocks.1.hook_resid_post"
    prompt = SENTENCES[2]
    full = client.trace(prompt, hook)[0]
    n = len(full.token_ids)
    last = client.trace(prompt, hook, positions="last")[0]
    assert last.positions == [n - 1]
    assert_matches(last.activations, full.activations, close, rows=[n - 1])
    picked = client.trace(prompt, hook, positions=[-1, 0, 3, -4])[0]
    assert picked.positions == sorted({n - 1, 0, 3, n - 4})
    assert_matches(picked.activations, full.activations, close, rows=picked.positions)
    none = client.trace(prompt, hook, positions="none")[0]
    assert none.positions == [] and tuple(none.activations[hook].shape) == (0, client.model_info().d_model)


def test_top_k_logits_match_hf(target) -> None:  # noqa: ANN001
    client, hf, _, _ = target
    trace = client.trace(SENTENCES[1], top_k=5)[0]
    logprobs = torch.log_softmax(hf_activations(hf, trace.token_ids)["logits"][-1], dim=-1)
    values, ids = logprobs.topk(5)
    assert trace.top_logits.token_ids == ids.tolist()
    assert max(abs(a - b) for a, b in zip(trace.top_logits.logprobs, values.tolist(), strict=True)) < 1e-4


def test_capture_dtype_conversion(client) -> None:  # noqa: ANN001
    hook = "blocks.3.hook_resid_post"
    as_fp32 = client.trace(SENTENCES[0], hook)[0].activations[hook]
    as_bf16 = client.trace(SENTENCES[0], hook, dtype="bfloat16")[0].activations[hook]
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, as_fp32.to(torch.bfloat16))
