"""Other model families than Llama: each gets a tiny random model, its own gateway, and an HF comparison.

Qwen2 shares the Llama-family layer layout (with attention biases); GPT-2 blocks take and return the full
residual stream and add learned position embeddings before the first block.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gateway_process import GatewayProcess
from interpgw_client import Client
from reference import hf_activations
from tiny_models import TINY_SERVER_ARGS, save_tiny_model

pytestmark = pytest.mark.engine


def tiny_qwen2():  # noqa: ANN201
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config)


def tiny_gpt2():  # noqa: ANN201
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=49152, n_embd=128, n_layer=3, n_head=2, n_positions=1024, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(params=["qwen2", "gpt2"], scope="module")
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    torch.manual_seed(1)
    model = {"qwen2": tiny_qwen2, "gpt2": tiny_gpt2}[request.param]()
    folder = save_tiny_model(model, tmp_path_factory.mktemp(f"tiny-{request.param}"), default_model_dir)
    gateway = GatewayProcess("--model", str(folder), *TINY_SERVER_ARGS)
    yield request.param, model.eval(), gateway
    gateway.stop()


def test_every_hook_point_matches_hf(family) -> None:  # noqa: ANN001
    name, hf, gateway = family
    with Client(gateway.address, as_torch=True, timeout=300) as client:
        info = client.model_info()
        assert info.architecture == {"qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[name]
        prompts = ["A short prompt.", "A longer prompt that is prefilled in several chunks. " * 6]
        result = client.trace(prompts, info.hook_points)
    for trace in result:
        assert trace.positions == list(range(len(trace.token_ids)))
        reference = hf_activations(hf, trace.token_ids)
        for hook in info.hook_points:
            diff = float((trace.activations[hook] - reference[hook]).abs().max())
            assert diff < 1e-4, f"{name} {hook}: {diff:.3g}"
