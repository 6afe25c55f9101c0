"""Shared fixtures: real gateway processes (vLLM engines) and Hugging Face reference models."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from gateway_process import GatewayProcess
from tiny_models import TINY_SERVER_ARGS, save_tiny_model

# The default model's server: fp32 for exactness, a small step budget so long prompts are chunked.
DEFAULT_SERVER_ARGS = (
    "--dtype",
    "float32",
    "--max-num-batched-tokens",
    "64",
    "--max-num-seqs",
    "32",
    "--kv-cache-gib",
    "1",
    "--max-capture-bytes",
    str(256 * 2**20),
    "--enable-fault-injection",
)


REDIS_URL = os.environ.get("INTERPGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_args() -> tuple[str, ...]:
    """Gateways of one test session share the real Redis under a key prefix of their own, removed at the end."""
    import redis

    prefix = f"interpgw-test-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # the suite needs the real Redis (see README); fail loudly rather than skip
    yield ("--redis-url", REDIS_URL, "--redis-prefix", prefix)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_prefix():
    """A key prefix unique to the test in the real Redis; every key under it is deleted afterwards."""
    import redis

    prefix = f"interpgw-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from interpgw.models.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny random Llama (4 layers, d_model 128) with SmolLM2's tokenizer, saved as a normal folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return save_tiny_model(LlamaForCausalLM(config), folder, default_model_dir)


@pytest.fixture(scope="session")
def default_gateway(default_model_dir: Path, redis_args: tuple[str, ...]):
    gateway = GatewayProcess(*DEFAULT_SERVER_ARGS, *redis_args)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def tiny_gateway(tiny_llama_dir: Path, redis_args: tuple[str, ...]):
    gateway = GatewayProcess("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, *redis_args)
    yield gateway
    gateway.stop()


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_default(default_model_dir: Path):
    return _load_hf(default_model_dir)


@pytest.fixture(scope="session")
def hf_tiny(tiny_llama_dir: Path):
    return _load_hf(tiny_llama_dir)


@pytest.fixture
def client(default_gateway: GatewayProcess):
    from interpgw_client import Client

    with Client(default_gateway.address, as_torch=True, timeout=300) as c:
        yield c


@pytest.fixture
def tiny_client(tiny_gateway: GatewayProcess):
    from interpgw_client import Client

    with Client(tiny_gateway.address, as_torch=True, timeout=300) as c:
        yield c
