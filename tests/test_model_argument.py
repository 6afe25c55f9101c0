"""`--model` checks that `interpgw serve` runs before loading anything (no engine, no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from interpgw.models.resolve import model_argument_error


def test_a_model_folder_the_default_and_hub_ids_pass(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    for model in (str(tmp_path), "default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert model_argument_error(model) is None, model
    assert model_argument_error("Qwen/Qwen2-0.5B") is None  # a hub id: only loading it can tell
    assert model_argument_error("gpt2") is None
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"")
    assert model_argument_error(str(weights)) is None  # a file: vLLM decides what it can load


@pytest.mark.parametrize("model", ["/no/such/model", "./no-such-model", "~/no-such-model-here", "a/b/c"])
def test_a_path_that_does_not_exist_is_named(model: str) -> None:
    assert model_argument_error(model) == f"{model}: no such folder (and not a hub id, which is NAME or ORG/NAME)"


def test_a_folder_without_config_json_is_named(tmp_path: Path) -> None:
    assert model_argument_error(str(tmp_path)) == (
        f"{tmp_path} is a folder without config.json (a Hugging Face model folder has one)"
    )
