"""Reference activations from a Hugging Face transformers forward of the same weights.

Computed independently of the gateway: forward hooks on HF's modules, TransformerLens naming.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_activations(model, token_ids: list[int]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every hook point for one prompt: name -> [n_tokens, d_model] (float32), plus "logits"."""
    gpt2 = hasattr(model, "transformer")
    inner = model.transformer if gpt2 else model.model
    layers = inner.h if gpt2 else inner.layers
    store: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):  # noqa: ANN001, ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            tensor = output[0] if isinstance(output, tuple) else output
            store[name] = tensor[0].detach().float().clone()

        return hook

    handles.append((inner.wte if gpt2 else inner.embed_tokens).register_forward_hook(keep("hook_embed")))
    for i, layer in enumerate(layers):
        attn = layer.attn if gpt2 else layer.self_attn
        handles.append(attn.register_forward_hook(keep(f"blocks.{i}.hook_attn_out")))
        handles.append(layer.mlp.register_forward_hook(keep(f"blocks.{i}.hook_mlp_out")))
    final_norm = inner.ln_f if gpt2 else inner.norm
    handles.append(final_norm.register_forward_hook(keep("ln_final.hook_normalized")))
    try:
        out = model(torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = out.hidden_states  # n_layers + 1 entries; the last one is after the final norm
    n_layers = len(layers)
    for i in range(n_layers):
        pre = hidden[i][0].float()
        mid = pre + store[f"blocks.{i}.hook_attn_out"]
        store[f"blocks.{i}.hook_resid_pre"] = pre
        store[f"blocks.{i}.hook_resid_mid"] = mid
        store[f"blocks.{i}.hook_resid_post"] = (
            hidden[i + 1][0].float() if i + 1 < n_layers else mid + store[f"blocks.{i}.hook_mlp_out"]
        )
    store["logits"] = out.logits[0].float()
    return store


def scaled_max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference, each token's row measured in units of max(1, that row's largest |value|).

    SmolLM2 carries a massive activation (~2.2e4) on its first token; fp32 spacing there is ~2e-3, so a
    plain absolute 1e-4 is unattainable between any two fp32 implementations on that row.
    """
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    return float(((actual - expected).abs() / scale).max())
