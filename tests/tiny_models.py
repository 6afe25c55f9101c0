"""Tiny random models saved as normal model folders (with SmolLM2's tokenizer) for vLLM and transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Serving flags for tiny models: fp32 for exactness, a 32-token step budget so longer prompts are chunked.
TINY_SERVER_ARGS = (
    "--dtype", "float32",
    "--max-num-batched-tokens", "32",
    "--max-num-seqs", "32",
    "--max-model-len", "1024",
    "--kv-cache-gib", "0.5",
)  # fmt: skip


def save_tiny_model(model: torch.nn.Module, folder: Path, tokenizer_dir: Path) -> Path:
    """Scale the init up (so activations are not all near zero), save weights and the tokenizer files."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder
