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


def test_edits_match_hf_with_the_same_edits(family) -> None:  # noqa: ANN001
    """Several ops at once, at hook points whose edits take different paths in each layer layout."""
    from interpgw_client import Intervention

    name, hf, gateway = family
    gen = torch.Generator().manual_seed(5)
    v = {k: torch.randn(128, generator=gen) * 3 for k in ("add", "proj", "clamp")}
    unit = {k: t / t.norm() for k, t in v.items()}
    interventions = [
        Intervention("project_out", "blocks.0.hook_resid_pre", v["proj"]),
        Intervention("zero", "blocks.0.hook_attn_out", positions=[-1]),
        Intervention("scale", "blocks.1.hook_mlp_out", scale=0.5),
        Intervention("add", "blocks.1.hook_resid_post", v["add"], scale=2.0),
        Intervention("clamp", "blocks.2.hook_resid_mid", v["clamp"], value=-3.0),
    ]

    def last_zeroed(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[-1] = 0
        return x

    edits = {
        "blocks.0.hook_resid_pre": lambda x: x - (x @ unit["proj"])[:, None] * unit["proj"],
        "blocks.0.hook_attn_out": last_zeroed,
        "blocks.1.hook_mlp_out": lambda x: 0.5 * x,
        "blocks.1.hook_resid_post": lambda x: x + 2.0 * v["add"],
        "blocks.2.hook_resid_mid": lambda x: x + (-3.0 - x @ unit["clamp"])[:, None] * unit["clamp"],
    }
    with Client(gateway.address, as_torch=True, timeout=300) as client:
        hooks = client.model_info().hook_points
        trace = client.trace("A prompt for the edited forward pass, long enough to chunk. " * 3, hooks,
                             interventions=interventions)[0]  # fmt: skip
    reference = hf_activations(hf, trace.token_ids, edits=edits)
    for hook in hooks:
        if hook == "blocks.2.hook_attn_out":
            continue  # the reference edits resid_mid through attn_out (see reference.edit_hooks)
        diff = float((trace.activations[hook] - reference[hook]).abs().max())
        assert diff < 1e-4, f"{name} {hook}: {diff:.3g}"
    assert float((trace.activations["blocks.0.hook_resid_pre"] @ unit["proj"]).abs().max()) < 1e-4
