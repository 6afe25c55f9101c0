"""Turn `--model` into something vLLM loads: 'default', a local folder, or a hub id."""

from __future__ import annotations

from pathlib import Path

from interpgw.models.default_model import DEFAULT_MODEL_ID, ensure_default_model


def resolve_model(model: str) -> tuple[str | Path, str]:
    """Return (what to load, default served id)."""
    if model in ("default", DEFAULT_MODEL_ID, f"HuggingFaceTB/{DEFAULT_MODEL_ID}"):
        return ensure_default_model(), DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    return model, model  # a hub id: vLLM resolves it (needs network or a populated HF cache)
