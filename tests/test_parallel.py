"""Tensor parallelism on the CPU: the same tiny model split across 2 ranks (two vLLM worker processes) captures,
steers and signals the same as on one rank. vLLM's CPU backend needs its threads bound by hand when one machine
has a single NUMA node: one core per rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway_process import GatewayProcess
from interpgw_client import Client, Signals
from tiny_models import TINY_SERVER_ARGS

pytestmark = pytest.mark.engine

HOOKS = [
    "hook_embed",
    "blocks.0.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "blocks.2.hook_resid_mid",
    "blocks.3.hook_resid_post",
    "ln_final.hook_normalized",
]
PROMPT = "Tensor parallel ranks each hold half of every layer"


def run(client: Client) -> dict:
    trace = client.trace(PROMPT, HOOKS, positions="all", cache="bypass")[0]
    steer = [{"op": "add", "hook": "blocks.1.hook_resid_post", "vector": np.ones(128, np.float32), "scale": 3.0}]
    steered = client.generate(PROMPT, max_tokens=10, temperature=0, ignore_eos=True, interventions=steer)
    plain = client.generate(
        PROMPT,
        max_tokens=10,
        temperature=0,
        ignore_eos=True,
        signals=Signals(lens_layers=[1, 2]),
        capture=HOOKS[-1:],
        capture_generated=True,
    )
    return {
        "acts": {h: np.asarray(trace.activations[h], dtype=np.float32) for h in HOOKS},
        "steered": steered.token_ids,
        "plain": plain.token_ids,
        "entropy": [s.entropy for s in plain.signals],
        "lens_kl": [s.lens_kl for s in plain.signals],
        "generated_acts": np.asarray(plain.activations[HOOKS[-1]], dtype=np.float32),
    }


def test_two_tensor_parallel_ranks_capture_steer_and_signal_like_one(tiny_llama_dir: Path, tiny_client) -> None:
    one_rank = run(tiny_client)
    gateway = GatewayProcess(
        "--model",
        str(tiny_llama_dir),
        *TINY_SERVER_ARGS,
        "--tensor-parallel-size",
        "2",
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    try:
        with Client(gateway.address, timeout=300) as client:
            two_ranks = run(client)
    finally:
        gateway.stop()
    for hook in HOOKS:  # fp32; the ranks' partial sums are added in another order: not bit-identical
        np.testing.assert_allclose(two_ranks["acts"][hook], one_rank["acts"][hook], atol=1e-4, err_msg=hook)
    np.testing.assert_allclose(two_ranks["generated_acts"], one_rank["generated_acts"], atol=1e-4)
    assert two_ranks["plain"] == one_rank["plain"]
    assert two_ranks["steered"] == one_rank["steered"] != one_rank["plain"]
    assert len(two_ranks["entropy"]) == len(one_rank["entropy"]) == 10  # signals reported once, by rank 0
    np.testing.assert_allclose(two_ranks["entropy"], one_rank["entropy"], atol=1e-4)
    np.testing.assert_allclose(two_ranks["lens_kl"], one_rank["lens_kl"], atol=1e-4)
