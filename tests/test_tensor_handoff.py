"""Captured tensors from the worker to the gateway through shared memory (engine/tensor_handoff.py).

The unit tests run the writer and the reader in this process; the last test runs a real gateway and checks that
its captures take the shared-memory path, leave no file behind, and fall back to the RPC when the directory is gone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gateway_process import GatewayProcess
from interpgw.engine.tensor_handoff import DIR_PREFIX, HandoffDirectory, HandoffWriter
from tiny_models import TINY_SERVER_ARGS

FALLBACK_WARNING = "shared-memory handoff failed"


@pytest.fixture
def handoff(tmp_path: Path):
    directory = HandoffDirectory(root=str(tmp_path))
    yield directory
    directory.close()


def test_tensors_arrive_exact_and_the_file_is_unlinked_when_read(handoff: HandoffDirectory) -> None:
    torch.manual_seed(0)
    tensors = {
        "blocks.0.hook_resid_post": torch.randn(7, 5, dtype=torch.bfloat16),
        "blocks.1.hook_resid_post": torch.randn(3, 4),
        "hook_embed": torch.randn(2, 3, dtype=torch.float16),
        "blocks.2.hook_attn_out": torch.empty(0, 576),
        "blocks.3.hook_mlp_out": torch.randn(10, 3)[:, 1],  # not contiguous
    }
    handle = HandoffWriter(handoff.path).write(tensors)
    assert handle is not None
    assert all(offset % 64 == 0 for _, _, offset in handle["tensors"].values())
    assert os.listdir(handoff.path) == [handle["file"]]
    received = handoff.read(handle)
    assert os.listdir(handoff.path) == []  # the mapping holds the pages now
    for hook, tensor in tensors.items():
        assert received[hook].dtype == tensor.dtype and torch.equal(received[hook], tensor), hook
    received["hook_embed"][0, 0] = 1.0  # a private copy-on-write view: writable, and nobody else sees it


def test_close_removes_the_directory_and_unread_files(handoff: HandoffDirectory) -> None:
    assert HandoffWriter(handoff.path).write({"a": torch.ones(4, 4)}) is not None
    handoff.close()
    assert not os.path.exists(handoff.path)


def test_a_writer_that_cannot_see_the_directory_sends_bytes(handoff: HandoffDirectory, tmp_path: Path) -> None:
    assert HandoffWriter(str(tmp_path / "elsewhere")).write({"a": torch.ones(2, 2)}) is None
    assert HandoffWriter(None).write({"a": torch.ones(2, 2)}) is None
    writer = HandoffWriter(handoff.path)
    os.rmdir(handoff.path)  # removed after the worker looked
    assert writer.write({"a": torch.ones(2, 2)}) is None


def test_a_full_file_system_falls_back_to_bytes_and_leaves_no_file(tmp_path: Path) -> None:
    """pwrite fails with an error (here EFBIG under a file-size limit; ENOSPC on a full tmpfs) instead of the
    SIGBUS a store into a mapping would raise; the partial file is removed."""
    script = textwrap.dedent(
        f"""
        import os, resource, torch
        from interpgw.engine.tensor_handoff import HandoffWriter
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        writer = HandoffWriter({str(tmp_path)!r})
        assert writer.write({{"small": torch.ones(16, 16)}}) is not None  # 1 KiB fits
        assert writer.write({{"large": torch.ones(64, 64)}}) is None  # 16 KiB does not
        print(len(os.listdir({str(tmp_path)!r})))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"  # only the file that fitted
    assert FALLBACK_WARNING in done.stderr


def test_handles_naming_other_paths_are_refused(handoff: HandoffDirectory) -> None:
    for name in ("../x.tensors", "x.bin", "/etc/passwd"):
        with pytest.raises(ValueError):
            handoff.read({"file": name, "size": 64, "tensors": {}})


def test_directories_of_dead_gateways_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{DIR_PREFIX}{dead.pid}-abc"
    living = tmp_path / f"{DIR_PREFIX}{os.getppid()}-def"
    other = tmp_path / "something-else"
    for folder in (orphan, living, other):
        folder.mkdir()
        (folder / "x.tensors").write_bytes(b"x")
    directory = HandoffDirectory(root=str(tmp_path))
    try:
        assert not orphan.exists() and living.exists() and other.exists()
        assert Path(directory.path).name.startswith(f"{DIR_PREFIX}{os.getpid()}-")
    finally:
        directory.close()


class SlowWorker:
    """vLLM's `collective_rpc` as `VllmEngine.collect` sees it: the worker pops the capture, writes its handoff
    file, and the reply arrives later (the engine core's step loop)."""

    def __init__(self, directory: str) -> None:
        self.writer = HandoffWriter(directory)
        self.written = asyncio.Event()

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        assert method == "interpgw_pop"
        (keys,) = args
        replies = {key: {"positions": [0, 1], "handoff": self.writer.write({"a": torch.ones(2, 4)})} for key in keys}
        self.written.set()
        await asyncio.sleep(0.2)
        return [replies]


def test_a_collect_cancelled_after_the_worker_wrote_still_unlinks_the_file(handoff: HandoffDirectory) -> None:
    from interpgw.engine.vllm_engine import VllmEngine

    async def main() -> None:
        worker = SlowWorker(handoff.path)
        engine = VllmEngine(worker, facts=None, signals=None, handoff=handoff)  # type: ignore[arg-type]
        collecting = asyncio.ensure_future(engine.collect(["r1"]))
        await worker.written.wait()
        assert len(os.listdir(handoff.path)) == 1
        collecting.cancel()  # the client went away between the worker's write and the reply
        with pytest.raises(asyncio.CancelledError):
            await collecting
        for _ in range(100):  # the shielded collection goes on and reads (unlinks) the file
            if not os.listdir(handoff.path):
                break
            await asyncio.sleep(0.05)
        assert os.listdir(handoff.path) == []
        result = await engine.collect(["r2"])  # and the engine still collects normally
        assert torch.equal(result["r2"].tensors["a"], torch.ones(2, 4)) and result["r2"].positions == [0, 1]

    asyncio.run(main())


def test_a_gateway_hands_captures_over_in_shared_memory_and_falls_back_without_it(
    tiny_llama_dir: Path, hf_tiny
) -> None:  # noqa: ANN001
    from interpgw_client import Client

    gateway = GatewayProcess("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS)
    try:
        folders = [p for p in Path("/dev/shm").glob(f"{DIR_PREFIX}{gateway.process.pid}-*")]
        assert len(folders) == 1, folders
        folder = folders[0]
        hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.3.hook_resid_post", "ln_final.hook_normalized"]
        prompt = "Shared memory between the worker and the gateway."
        with Client(gateway.address, as_torch=True, timeout=300) as client:
            before = folder.stat().st_mtime_ns
            through_memory = client.trace(prompt, hooks, cache="bypass")[0]
            assert folder.stat().st_mtime_ns != before  # a file was made there (and unlinked: the folder is empty)
            assert list(folder.iterdir()) == []
            assert FALLBACK_WARNING not in gateway.log_path.read_text(errors="replace")

            aside = folder.with_name(folder.name + "-aside")
            folder.rename(aside)  # the worker can no longer write there: bytes through the RPC
            try:
                through_rpc = client.trace(prompt, hooks, cache="bypass")[0]
            finally:
                aside.rename(folder)
            before = folder.stat().st_mtime_ns
            assert FALLBACK_WARNING in gateway.log_path.read_text(errors="replace")
            # back on the shared-memory path; a generation's capture takes it too
            again = client.generate(
                through_memory.token_ids, max_tokens=4, temperature=0.0, capture=hooks, capture_generated=True
            )
            assert folder.stat().st_mtime_ns != before and list(folder.iterdir()) == []

        for hook in hooks:
            expected = through_memory.activations[hook]
            assert expected.shape[0] == len(through_memory.token_ids) and expected.abs().sum() > 0
            assert torch.equal(through_rpc.activations[hook], expected), hook
            assert torch.allclose(again.activations[hook][: expected.shape[0]], expected, atol=1e-5), hook
        ids = torch.tensor([through_memory.token_ids])
        with torch.no_grad():
            reference = hf_tiny(ids, output_hidden_states=True).hidden_states
        assert torch.allclose(through_memory.activations["blocks.0.hook_resid_post"], reference[1][0], atol=1e-4)
    finally:
        gateway.stop()
    assert not folder.exists()
