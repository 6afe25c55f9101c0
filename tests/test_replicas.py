"""Scale-out with real processes: two replicas sharing the real Redis behave as one service, and one gateway serves
several models, each with its own engine, routed by model id."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway_process import GatewayProcess
from interpgw_client import Client, InvalidArgumentError, UnavailableError
from tiny_models import TINY_SERVER_ARGS, save_tiny_model

pytestmark = pytest.mark.engine

HOOK = "blocks.1.hook_resid_post"


def test_two_replicas_share_state_and_the_sdk_fails_over(tiny_llama_dir: Path, redis_args: tuple[str, ...]) -> None:
    """Also what a restart needs: once A is gone, the vector created through A still steers on B, read from Redis."""
    args = ("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, *redis_args, "--shutdown-grace", "0")
    a = GatewayProcess(*args)
    b = GatewayProcess(*args)
    try:
        with Client(a.address, timeout=120) as on_a, Client(b.address, timeout=120) as on_b:
            # a vector created through A steers generations on B exactly as on A
            rng = np.random.default_rng(0)
            vector = on_a.steering.create(rng.standard_normal(128).astype(np.float32), HOOK, name="shared")
            steer = {"vector": vector.id, "scale": 4.0}
            prompt = "Replicas share one registry"
            via_a = on_a.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True, steer=steer)
            via_b = on_b.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True, steer=steer)
            plain = on_b.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
            assert via_b.token_ids == via_a.token_ids != plain.token_ids

            # a trace computed on A is a cache hit on B, bit-identical
            unique = f"A trace cached by one replica {uuid.uuid4().hex}"
            first = on_a.trace(unique, [HOOK], positions="all")[0]
            second = on_b.trace(unique, [HOOK], positions="all")[0]
            assert not first.cache_hit and second.cache_hit
            assert np.array_equal(first.activations[HOOK], second.activations[HOOK])

            # a trace stored through B is readable through A
            handle = on_b.trace(unique, [HOOK], positions="last", store=True)[0].handle
            assert np.array_equal(on_a.get_trace(handle).activations[HOOK], first.activations[HOOK][-1:])

        with Client([a.address, b.address], timeout=120) as both, Client(a.address, timeout=120) as pinned:
            assert len(both.generate(prompt, max_tokens=3, temperature=0).token_ids) == 3  # both replicas reached
            stream = pinned.generate_stream(prompt, max_tokens=800, temperature=0, ignore_eos=True)
            events = iter(stream)
            next(events)
            a.process.send_signal(signal.SIGTERM)  # stopped mid-stream, no grace
            with pytest.raises(UnavailableError):
                for _ in events:
                    pass
            a.process.wait(60)
            # every later call through the balanced client lands on B
            for _ in range(6):
                assert len(both.generate(prompt, max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
                assert both.steering.get(vector.id).id == vector.id
            # the registry outlives the replica that wrote it: listed, and steering exactly as before
            assert vector.id in [v.id for v in both.steering.list()]
            again = both.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True, steer=steer)
            assert again.token_ids == via_a.token_ids
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def second_tiny_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A second tiny random Llama with another width (d_model 64), so routing mistakes show in shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(1)
    return save_tiny_model(LlamaForCausalLM(config), tmp_path_factory.mktemp("tiny-llama-64"), default_model_dir)


def test_one_gateway_serves_several_models_routed_by_id(
    tiny_llama_dir: Path, second_tiny_dir: Path, tiny_client
) -> None:
    gateway = GatewayProcess(
        *("--model", str(tiny_llama_dir), "--served-model-id", "tiny-128"),
        *("--model", str(second_tiny_dir), "--served-model-id", "tiny-64"),
        *TINY_SERVER_ARGS,
    )
    try:
        with Client(gateway.address, timeout=120) as client:
            models = {m.id: m for m in client.models()}
            assert set(models) == {"tiny-128", "tiny-64"}
            assert (models["tiny-128"].d_model, models["tiny-128"].n_layers) == (128, 4)
            assert (models["tiny-64"].d_model, models["tiny-64"].n_layers) == (64, 3)
            assert client.model_info().id == "tiny-128"  # the first --model is the default

            prompt = "Routing by model id"
            for model, width in (("tiny-128", 128), ("tiny-64", 64)):
                trace = client.trace(prompt, [HOOK], positions="last", model=model)[0]
                assert trace.activations[HOOK].shape == (1, width)
            # the same weights served alone give the same activations: nothing leaks between the engines
            alone = tiny_client.trace(prompt, [HOOK], positions="last", cache="bypass")[0]
            together = client.trace(prompt, [HOOK], positions="last", model="tiny-128", cache="bypass")[0]
            assert np.allclose(np.asarray(alone.activations[HOOK]), together.activations[HOOK], atol=1e-5)

            # a vector is bound to its model
            vector = client.steering.create(np.ones(64, np.float32), HOOK, model="tiny-64")
            steered = client.generate(prompt, max_tokens=4, temperature=0, model="tiny-64", steer=vector.id)
            assert len(steered.token_ids) == 4
            with pytest.raises(InvalidArgumentError):
                client.generate(prompt, max_tokens=4, temperature=0, model="tiny-128", steer=vector.id)
            with pytest.raises(InvalidArgumentError, match="tiny-128, tiny-64"):
                client.generate(prompt, max_tokens=2, model="no-such-model")
    finally:
        gateway.stop()
