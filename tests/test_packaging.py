"""The SDK installs and works on its own: no torch, no vLLM, stubs generated at build time."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_client_installs_without_torch_and_talks_to_a_gateway(tmp_path: Path, default_gateway) -> None:  # noqa: ANN001
    # from the sources a fresh checkout has: the working tree's generated stubs must not hide a build that
    # leaves them out
    source = tmp_path / "src"
    generated = shutil.ignore_patterns("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*.egg-info", "build", "__pycache__")
    shutil.copytree(ROOT / "client", source / "client", ignore=generated)
    shutil.copytree(ROOT / "proto", source / "proto")
    assert not list((source / "client").rglob("*_pb2*.py"))
    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(source / "client")], capture_output=True, text=True, timeout=500
    )
    assert install.returncode == 0, install.stderr[-2000:]
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('vllm') is None\n"
        "from interpgw_client import Client\n"
        f"c = Client({default_gateway.address!r})\n"
        "t = c.trace('Hello there', 'blocks.0.hook_resid_post', positions='last', dtype='bfloat16')[0]\n"
        "a = t.activations['blocks.0.hook_resid_post']\n"
        "print(a.shape, a.dtype)\n"
    )
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 576) float32"
    cli = subprocess.run(
        [str(tmp_path / "env" / "bin" / "interpgw"), "models", "--address", default_gateway.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and "SmolLM2-135M-Instruct" in cli.stdout, cli.stderr
    serve = subprocess.run(
        [str(tmp_path / "env" / "bin" / "interpgw"), "serve"], capture_output=True, text=True, timeout=60
    )
    assert serve.returncode == 2 and "needs the server package" in serve.stderr
