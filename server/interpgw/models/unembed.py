"""The unembedding matrix, read from the checkpoint files (not from vLLM's modules).

vLLM's CPU backend repacks linear weights (a weight can read as shape `(0,)`), so anything that needs logits
outside the engine (patching metrics, later the logit lens) reads `lm_head` from the safetensors files, or
the input embedding when the model ties them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from interpgw.core.errors import Unavailable

# Checked in order: an untied head first, then the input embeddings of tied models (Llama family, GPT-2).
_CANDIDATE_SUFFIXES = ("lm_head.weight", "embed_tokens.weight", "wte.weight")


def load_unembedding(model_dir: str | Path, vocab_size: int, d_model: int) -> torch.Tensor:
    """`[vocab_size, d_model]` float32 unembedding (rows: token ids)."""
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise Unavailable(f"no safetensors files in {model_dir}: logits outside the engine need a local checkpoint")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                names[name] = file
    for suffix in _CANDIDATE_SUFFIXES:
        for name, file in names.items():
            if name.endswith(suffix):
                with safe_open(str(file), framework="pt") as handle:
                    weight = handle.get_tensor(name).to(torch.float32)
                if weight.shape[1] == d_model and weight.shape[0] >= vocab_size:
                    return weight[:vocab_size].contiguous()  # [vocab_size, d_model]
    raise Unavailable(f"no unembedding ({', '.join(_CANDIDATE_SUFFIXES)}) of shape [{vocab_size}, {d_model}] found")
