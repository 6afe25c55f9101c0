"""Turn `--model` into something vLLM loads: 'default', a local folder, or a hub id."""

from __future__ import annotations

from pathlib import Path

from interpgw.models.default_model import DEFAULT_MODEL_ID, ensure_default_model


def _is_default(model: str) -> bool:
    return model in ("default", DEFAULT_MODEL_ID, f"HuggingFaceTB/{DEFAULT_MODEL_ID}")


def model_argument_error(model: str) -> str | None:
    """Why `--model` cannot name a model, found without loading anything (a typo in a path would otherwise
    surface minutes later as a hub lookup's traceback); None when it may."""
    if _is_default(model):
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{model} is a folder without config.json (a Hugging Face model folder has one)"
        return None
    if path.exists():
        return None  # a file (a .gguf, say): vLLM decides
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        return f"{model}: no such folder (and not a hub id, which is NAME or ORG/NAME)"
    return None


def resolve_model(model: str) -> tuple[str | Path, str]:
    """Return (what to load, default served id)."""
    if _is_default(model):
        return ensure_default_model(), DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    return model, model  # a hub id: vLLM resolves it (needs network or a populated HF cache)
