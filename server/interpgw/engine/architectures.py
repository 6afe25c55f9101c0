"""Where the hookable modules live inside vLLM's model classes, per architecture family.

This is the only file that knows module paths. Llama-family layers (Llama, Mistral, Qwen2, ...) take and
return `(hidden, residual)` with the residual *not yet added*; GPT-2 blocks take and return the full
residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GPT2LMHeadModel",
)


@dataclass
class ModelModules:
    embed: nn.Module
    layers: list[nn.Module]
    attn: list[nn.Module]
    mlp: list[nn.Module]
    final_norm: nn.Module
    fused_residual: bool  # True: layer returns (mlp_out, resid_mid); False: layer returns resid_post

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def locate_modules(model: nn.Module) -> ModelModules:
    """Find embed/layers/attn/mlp/final norm of a vLLM causal LM."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        layers = list(inner.layers)
        return ModelModules(
            embed=inner.embed_tokens,
            layers=layers,
            attn=[layer.self_attn for layer in layers],
            mlp=[layer.mlp for layer in layers],
            final_norm=inner.norm,
            fused_residual=True,
        )
    inner = getattr(model, "transformer", None)
    if inner is not None and hasattr(inner, "h"):
        layers = list(inner.h)
        return ModelModules(
            embed=inner.wte,
            layers=layers,
            attn=[block.attn for block in layers],
            mlp=[block.mlp for block in layers],
            final_norm=inner.ln_f,
            fused_residual=False,
        )
    raise TypeError(
        f"cannot locate decoder layers in {type(model).__name__}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
