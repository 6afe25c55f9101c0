"""Reference activations from a Hugging Face transformers forward of the same weights.

Computed independently of the gateway: forward hooks on HF's modules, TransformerLens naming.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_activations(model, token_ids: list[int], edits: dict | None = None) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every hook point for one prompt: name -> [n_tokens, d_model] (float32), plus "logits".

    `edits` maps hook names to functions of the stream `[n_tokens, d_model]` (see `edit_hooks`); recording
    hooks are registered after the edits, so they see the edited stream. (Where resid_mid is edited, the
    recorded attn_out of that layer includes the edit.)
    """
    gpt2 = hasattr(model, "transformer")
    inner = model.transformer if gpt2 else model.model
    layers = inner.h if gpt2 else inner.layers
    store: dict[str, torch.Tensor] = {}
    handles = edit_hooks(model, edits or {})

    def keep(name):  # noqa: ANN001, ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            tensor = output[0] if isinstance(output, tuple) else output
            store[name] = tensor[0].detach().float().clone()

        return hook

    def keep_input(name):  # noqa: ANN001, ANN202
        def hook(module, args, kwargs):  # noqa: ANN001, ANN202
            hidden = args[0] if args else kwargs["hidden_states"]
            store[name] = hidden[0].detach().float().clone()

        return hook

    handles.append((inner.wte if gpt2 else inner.embed_tokens).register_forward_hook(keep("hook_embed")))
    for i, layer in enumerate(layers):
        attn = layer.attn if gpt2 else layer.self_attn
        handles.append(layer.register_forward_pre_hook(keep_input(f"blocks.{i}.hook_resid_pre"), with_kwargs=True))
        handles.append(attn.register_forward_hook(keep(f"blocks.{i}.hook_attn_out")))
        handles.append(layer.mlp.register_forward_hook(keep(f"blocks.{i}.hook_mlp_out")))
        handles.append(layer.register_forward_hook(keep(f"blocks.{i}.hook_resid_post")))
    final_norm = inner.ln_f if gpt2 else inner.norm
    handles.append(final_norm.register_forward_hook(keep("ln_final.hook_normalized")))
    try:
        out = model(torch.tensor([token_ids]))
    finally:
        for handle in handles:
            handle.remove()
    for i in range(len(layers)):
        store[f"blocks.{i}.hook_resid_mid"] = store[f"blocks.{i}.hook_resid_pre"] + store[f"blocks.{i}.hook_attn_out"]
    store["logits"] = out.logits[0].float()
    return store


def scaled_max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference, each token's row measured in units of max(1, that row's largest |value|).

    SmolLM2 carries a massive activation (~2.2e4) on its first token; fp32 spacing there is ~2e-3, so a
    plain absolute 1e-4 is unattainable between any two fp32 implementations on that row.
    """
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    return float(((actual - expected).abs() / scale).max())


def edit_hooks(model, edits: dict) -> list:  # noqa: ANN001
    """Install HF forward hooks that pass each edited hook point's stream through `edits[name]`.

    resid_pre/resid_post edit a layer's input/output; resid_mid, which HF never materialises, is edited
    through the attention output (attn' = f(pre + attn) - pre). Returns the handles (remove them after use).
    """
    gpt2 = hasattr(model, "transformer")
    inner = model.transformer if gpt2 else model.model
    layers = inner.h if gpt2 else inner.layers
    handles = []
    pre_stash: dict[int, torch.Tensor] = {}

    def on_output(fn):  # noqa: ANN001, ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            if isinstance(output, tuple):
                return (fn(output[0][0]).unsqueeze(0), *output[1:])
            return fn(output[0]).unsqueeze(0)

        return hook

    def on_layer_input(layer: int, fn):  # noqa: ANN001, ANN202
        def hook(module, args, kwargs):  # noqa: ANN001, ANN202
            hidden = args[0] if args else kwargs["hidden_states"]
            if fn is not None:
                hidden = fn(hidden[0]).unsqueeze(0)
            pre_stash[layer] = hidden[0]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def mid_via_attn(layer: int, fn):  # noqa: ANN001, ANN202
        return lambda attn: fn(pre_stash[layer] + attn) - pre_stash[layer]

    for name, fn in edits.items():
        if name == "hook_embed":
            handles.append((inner.wte if gpt2 else inner.embed_tokens).register_forward_hook(on_output(fn)))
        elif name == "ln_final.hook_normalized":
            handles.append((inner.ln_f if gpt2 else inner.norm).register_forward_hook(on_output(fn)))
    for i, layer in enumerate(layers):
        pre = edits.get(f"blocks.{i}.hook_resid_pre")
        mid = edits.get(f"blocks.{i}.hook_resid_mid")
        if pre is not None or mid is not None:
            handles.append(layer.register_forward_pre_hook(on_layer_input(i, pre), with_kwargs=True))
        attn = layer.attn if gpt2 else layer.self_attn
        if f"blocks.{i}.hook_attn_out" in edits:
            handles.append(attn.register_forward_hook(on_output(edits[f"blocks.{i}.hook_attn_out"])))
        if mid is not None:
            handles.append(attn.register_forward_hook(on_output(mid_via_attn(i, mid))))
        if f"blocks.{i}.hook_mlp_out" in edits:
            handles.append(layer.mlp.register_forward_hook(on_output(edits[f"blocks.{i}.hook_mlp_out"])))
        if f"blocks.{i}.hook_resid_post" in edits:
            handles.append(layer.register_forward_hook(on_output(edits[f"blocks.{i}.hook_resid_post"])))
    return handles


@torch.no_grad()
def hf_greedy(model, token_ids: list[int], max_new_tokens: int, edits: dict | None = None) -> list[int]:  # noqa: ANN001
    """Greedy continuation with edits applied at every position (prompt and generated), no KV-cache tricks."""
    handles = edit_hooks(model, edits or {})
    try:
        ids = list(token_ids)
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    finally:
        for handle in handles:
            handle.remove()
    return ids[len(token_ids) :]


@torch.no_grad()
def hf_token_signals(model, prompt_ids: list[int], output_ids: list[int], lens_layers: list[int]) -> list[dict]:  # noqa: ANN001
    """Per generated token: entropy, logprob, rank, margin and the logit lens (KL(final || lens), top-1) at
    `lens_layers`' resid_post through HF's final norm and lm_head, all from the forward that chose the token."""
    acts = hf_activations(model, prompt_ids + output_ids)
    gpt2 = hasattr(model, "transformer")
    norm = model.transformer.ln_f if gpt2 else model.model.norm
    out = []
    for i, token in enumerate(output_ids):
        row = len(prompt_ids) - 1 + i
        final = torch.log_softmax(acts["logits"][row], dim=-1)
        top2 = final.topk(2).values
        lens_kl, lens_top1 = [], []
        for layer in lens_layers:
            lens = torch.log_softmax(model.lm_head(norm(acts[f"blocks.{layer}.hook_resid_post"][row])).float(), dim=-1)
            lens_kl.append(float((final.exp() * (final - lens)).sum()))
            lens_top1.append(int(lens.argmax()))
        out.append(
            {
                "entropy": float(-(final.exp() * final).sum()),
                "logprob": float(final[token]),
                "rank": int((final > final[token]).sum()) + 1,
                "margin": float(top2[0] - top2[1]),
                "lens_kl": lens_kl,
                "lens_top1": lens_top1,
                "resid": {layer: acts[f"blocks.{layer}.hook_resid_post"][row] for layer in lens_layers},
            }
        )
    return out
