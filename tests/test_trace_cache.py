"""The activation cache and stored traces, end to end: real gateways, the real Redis, a Redis that dies."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
import redis
import torch

from gateway_process import GatewayProcess, free_port
from interpgw.cache.entries import CachedTrace
from interpgw_client import Client, Intervention
from tiny_models import TINY_SERVER_ARGS

pytestmark = pytest.mark.engine

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_attn_out"]


def unique_prompt() -> str:
    return f"Cache test {uuid.uuid4().hex[:8]}: the river runs to the sea."


def test_a_repeated_trace_is_a_hit_with_bit_identical_tensors(tiny_client) -> None:  # noqa: ANN001
    prompt = unique_prompt()
    for dtype in ("float32", "bfloat16"):
        first = tiny_client.trace(prompt, HOOKS, dtype=dtype, top_k=3)[0]
        again = tiny_client.trace(prompt, HOOKS, dtype=dtype, top_k=3)[0]
        assert not first.cache_hit and again.cache_hit
        assert again.token_ids == first.token_ids and again.positions == first.positions
        assert again.top_logits == first.top_logits
        for hook in HOOKS:
            assert again.activations[hook].dtype == first.activations[hook].dtype
            assert torch.equal(again.activations[hook].view(torch.uint8), first.activations[hook].view(torch.uint8))
    assert not tiny_client.trace(prompt, HOOKS, dtype="float32", cache="bypass")[0].cache_hit
    assert not tiny_client.trace(prompt, HOOKS, dtype="float32", cache="refresh")[0].cache_hit
    # what the key covers: other positions, hooks or edits are other entries
    assert not tiny_client.trace(prompt, HOOKS, positions="last", dtype="float32")[0].cache_hit
    assert not tiny_client.trace(prompt, HOOKS[:1], dtype="float32")[0].cache_hit
    edit = [Intervention("scale", "blocks.1.hook_resid_post", scale=0.5)]
    edited = tiny_client.trace(prompt, HOOKS, dtype="float32", interventions=edit)[0]
    assert not edited.cache_hit
    assert tiny_client.trace(prompt, HOOKS, dtype="float32", interventions=edit)[0].cache_hit


def test_a_corrupted_entry_in_redis_is_recomputed_and_the_near_copy_still_served(  # noqa: ANN001
    tiny_client, tiny_llama_dir, redis_args
) -> None:
    """The gateway that wrote an entry keeps a copy in its memory (the near cache) and serves hits from it even when
    Redis's copy is damaged; a replica that reads Redis (here one with no near cache) detects the damage and
    recomputes."""
    prefix = redis_args[redis_args.index("--redis-prefix") + 1]
    store = redis.Redis.from_url(redis_args[redis_args.index("--redis-url") + 1])
    before = set(store.scan_iter(match=f"{prefix}trace:*"))
    prompt = unique_prompt()
    first = tiny_client.trace(prompt, HOOKS, dtype="float32")[0]
    (key,) = set(store.scan_iter(match=f"{prefix}trace:*")) - before
    value = store.get(key)
    store.set(key, value[: len(value) // 2] + bytes([value[len(value) // 2] ^ 0xFF]) + value[len(value) // 2 + 1 :])
    near = tiny_client.trace(prompt, HOOKS, dtype="float32")[0]
    assert near.cache_hit
    redis_only = GatewayProcess(
        "--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, *redis_args, "--cache-max-bytes", "0"
    )
    try:
        with Client(redis_only.address, as_torch=True, timeout=120) as client:
            recomputed = client.trace(prompt, HOOKS, dtype="float32")[0]
            assert not recomputed.cache_hit
            assert client.trace(prompt, HOOKS, dtype="float32")[0].cache_hit, "the recomputed entry was written back"
    finally:
        redis_only.stop()
    assert CachedTrace.from_bytes(store.get(key)).token_ids == first.token_ids  # a sound value again
    for hook in HOOKS:
        np.testing.assert_array_equal(recomputed.activations[hook], first.activations[hook])
        np.testing.assert_array_equal(near.activations[hook], first.activations[hook])
    store.close()


def test_stored_traces_by_handle(tiny_client) -> None:  # noqa: ANN001
    hook = "blocks.1.hook_resid_post"
    refs = [unique_prompt(), unique_prompt()]
    stored = tiny_client.trace(refs, hook, dtype="float32", store=True)
    assert all(t.handle.startswith("tr_") for t in stored)
    fetched = tiny_client.get_trace(stored[0].handle)
    assert fetched.token_ids == stored[0].token_ids and fetched.tokens == stored[0].tokens
    np.testing.assert_array_equal(fetched.activations[hook], stored[0].activations[hook])
    # mean ablation from stored traces equals mean ablation from the same prompts
    by_prompt = Intervention("mean_ablate", hook, reference_prompts=refs)
    by_handle = Intervention("mean_ablate", hook, reference_traces=[t.handle for t in stored])
    a = tiny_client.trace("Water boils at", hook, dtype="float32", interventions=[by_prompt], cache="bypass")[0]
    b = tiny_client.trace("Water boils at", hook, dtype="float32", interventions=[by_handle], cache="bypass")[0]
    np.testing.assert_allclose(a.activations[hook], b.activations[hook], atol=1e-5)
    # patching from a stored clean run equals patching from the clean prompt
    clean, corrupted = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    clean_trace = tiny_client.trace(clean, [f"blocks.{i}.hook_resid_pre" for i in range(4)], store=True)[0]
    direct = tiny_client.patch(clean, corrupted, target=" Paris", foil=" Rome")
    from_store = tiny_client.patch(None, corrupted, clean_trace=clean_trace.handle, target=" Paris", foil=" Rome")
    np.testing.assert_allclose(np.asarray(from_store.metric), np.asarray(direct.metric), atol=1e-4)
    from interpgw_client.errors import InvalidArgumentError, NotFoundError

    with pytest.raises(NotFoundError, match="no stored trace"):
        tiny_client.get_trace("tr_" + "0" * 40)
    other_hooks = tiny_client.trace(clean, HOOKS, store=True)[0].handle
    with pytest.raises(InvalidArgumentError, match="must hold blocks.0.hook_resid_pre"):
        tiny_client.patch(None, corrupted, clean_trace=other_hooks, target=" Paris", foil=" Rome")


class RedisServer:
    """A redis-server of the test's own on a free port, to kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


def test_requests_survive_redis_dying_and_caching_resumes(tiny_llama_dir) -> None:  # noqa: ANN001
    server = RedisServer()
    server.start()
    gateway = None
    try:
        gateway = GatewayProcess(
            "--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, "--redis-url", server.url, "--no-startup-probe"
        )
        with Client(gateway.address, timeout=120) as client:
            prompt = unique_prompt()
            assert not client.trace(prompt, HOOKS)[0].cache_hit
            assert client.trace(prompt, HOOKS)[0].cache_hit
            vector = client.steering.create(np.ones(128, dtype=np.float32), ["blocks.1.hook_resid_post"])
            server.kill()
            assert all(client.trace(prompt, HOOKS)[0].cache_hit for _ in range(3))  # held in the gateway's memory
            new = unique_prompt()
            down = [client.trace(new, HOOKS)[0].cache_hit for _ in range(3)]  # every request still succeeds
            assert down == [False, True, True]  # computed, then kept in memory while Redis is away
            stored = client.trace(unique_prompt(), HOOKS, store=True)[0]  # storing falls back to memory
            assert client.get_trace(stored.handle).token_ids == stored.token_ids
            from interpgw_client.errors import UnavailableError

            with pytest.raises(UnavailableError, match="127.0.0.1"):  # the registry says where it is stored
                client.steering.get(vector.id)
            server.start()  # empty: a new process on the same port
            time.sleep(3)  # the cache retries Redis after its back-off
            again = unique_prompt()
            assert not client.trace(again, HOOKS)[0].cache_hit
            assert client.trace(again, HOOKS)[0].cache_hit
            written = redis.Redis.from_url(server.url)
            assert list(written.scan_iter(match="*trace:*")), "caching in Redis did not resume after it came back"
            written.close()
    finally:
        if gateway is not None:
            gateway.stop()
        server.kill()


def test_metrics_count_what_happened(tiny_gateway, tiny_client) -> None:  # noqa: ANN001
    assert tiny_gateway.metrics_url, "the gateway did not print its metrics address"
    model = tiny_client.model_info().id
    before = tiny_gateway.scrape()
    prompt = unique_prompt()
    first = tiny_client.trace(prompt, HOOKS, dtype="float32")[0]
    tiny_client.trace(prompt, HOOKS, dtype="float32")  # a cache hit
    generated = tiny_client.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True)
    from interpgw_client.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        tiny_client.trace(prompt, ["blocks.99.hook_resid_post"])
    vector = tiny_client.steering.create(np.ones(128, dtype=np.float32), ["blocks.1.hook_resid_post"])
    tiny_client.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True, steer=vector.id)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # the gateway pulls the worker's hook statistics every 5 s (and once after the engine goes idle): wait for them
    interventions = ("interpgw_batch_interventions_sum", (("model", model),))
    after = tiny_gateway.scrape_until(lambda s: s.get(interventions, 0.0) - before.get(interventions, 0.0) >= 4, 60)
    tiny_client.steering.delete(vector.id)

    assert delta("interpgw_rpc_requests_total", method="Trace", code="OK") == 2
    assert delta("interpgw_rpc_requests_total", method="Trace", code="INVALID_ARGUMENT") == 1
    assert delta("interpgw_rpc_requests_total", method="Generate", code="OK") == 2
    assert delta("interpgw_generated_tokens_total", model=model) == 5 + 4
    assert delta("interpgw_prompt_tokens_total", model=model) == 2 * len(generated.prompt_token_ids)
    n_bytes = sum(a.nbytes for a in first.activations.values())
    assert delta("interpgw_captured_bytes_total", model=model) == 2 * n_bytes  # the hit is streamed too
    assert delta("interpgw_captured_tensors_total", model=model) == 2 * len(HOOKS)
    # the hit came from the near cache in memory; Redis was asked only on the first lookup, and written once
    assert delta("interpgw_cache_events_total", backend="memory", kind="hit") == 1
    assert delta("interpgw_cache_events_total", backend="memory", kind="miss") == 1
    assert delta("interpgw_cache_events_total", backend="memory", kind="write") == 1
    assert delta("interpgw_cache_events_total", backend="redis", kind="hit") == 0
    assert delta("interpgw_cache_events_total", backend="redis", kind="miss") == 1
    assert delta("interpgw_cache_events_total", backend="redis", kind="write") == 1
    assert delta("interpgw_cache_bytes_read_total", backend="memory") > n_bytes
    assert after[("interpgw_cache_up", (("backend", "redis"),))] == 1
    assert after[("interpgw_cache_up", (("backend", "memory"),))] == 1
    assert delta("interpgw_time_to_first_token_seconds_count", model=model) == 2
    # from the engine worker: steps with hooks at work, their cost, and the steered steps' interventions
    assert delta("interpgw_forward_steps_total", model=model) >= 4
    assert delta("interpgw_hook_seconds_total", model=model) > 0
    assert delta("interpgw_batch_interventions_sum", model=model) >= 4  # one edit in each of >= 4 steps
    assert after[("interpgw_registry_vectors", ())] >= 1
    assert after[("interpgw_queue_depth", (("model", model),))] == 0
    assert after[("interpgw_rpc_in_flight", (("method", "Trace"),))] == 0
    assert ("interpgw_engine_kv_cache_usage_ratio", (("model", model),)) in after
