"""Captured tensors from the engine worker to the gateway through a shared-memory file instead of vLLM's RPC path.

A `collective_rpc` result travels worker → engine core → gateway, pickled into vLLM's message queue, encoded by
msgpack (bytes are copied inline), sent over ZeroMQ and decoded again: four copies of every captured byte, made
while the engine core holds its step loop. An all-layer capture of a 32-request batch is about 80 MB. So the
gateway makes a private directory on /dev/shm; the worker writes a finished request's tensors into one file there
and returns only its name and each tensor's dtype, shape and offset. The gateway maps the file and unlinks it at
once: the tensors it streams to the client are views of that mapping, freed when the last one is.

The worker writes with `pwrite`, not into a mapping: on a full tmpfs (Docker gives containers 64 MiB of /dev/shm
by default) that fails cleanly with ENOSPC, where a store into a mapping would kill the worker with SIGBUS; and it
skips the page faults of a fresh mapping, which cost more than the copy. Whenever the file cannot be written, or
the directory is not visible to the worker (a rank on another host), the tensors go through the RPC as bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import shutil
import tempfile
import uuid
from typing import Any

import torch

from interpgw.core.wire import dtype_name, torch_dtype

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
ALIGN = 64  # each tensor starts on a cache line (and on any dtype's alignment)
FILE_SUFFIX = ".tensors"
DIR_PREFIX = "interpgw-handoff-"  # then the gateway's pid: a killed gateway's directory is removed by the next one


def _remove_orphans(root: str) -> None:
    """Remove the directories of gateways that died without cleaning up (/dev/shm is memory, not disk)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not entry.name.startswith(DIR_PREFIX):
                continue
            pid = entry.name[len(DIR_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class HandoffWriter:
    """Worker side: writes one request's tensors into a file of the gateway's directory."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory if directory and os.path.isdir(directory) else None
        self._warned = False
        if directory and self.directory is None:  # another host or mount namespace
            log.warning("captured tensors go through the RPC: %s is not visible to this worker", directory)

    def write(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """`{"file", "size", "tensors": {hook: (dtype, shape, offset)}}`, or None: send these tensors as bytes."""
        if self.directory is None or not tensors:
            return None
        layout: dict[str, tuple[str, list[int], int]] = {}
        size = 0  # a file of 0 bytes cannot be mapped: the first tensor starts at 0 even when empty
        for hook, tensor in tensors.items():
            layout[hook] = (dtype_name(tensor), list(tensor.shape), size)
            size = _aligned(size + tensor.numel() * tensor.element_size())
        if size == 0:
            return None
        name = f"{uuid.uuid4().hex}{FILE_SUFFIX}"
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            self._warn(exc)
            return None
        try:
            for hook, tensor in tensors.items():
                offset = layout[hook][2]
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                _write_all(fd, memoryview(data), offset)
            os.ftruncate(fd, size)  # the padding after the last tensor
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._warn(exc)
            return None
        finally:
            os.close(fd)
        return {"file": name, "size": size, "tensors": layout}

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("captured tensors go through the RPC: shared-memory handoff failed (%s)", exc)


class HandoffDirectory:
    """Gateway side: the directory the worker writes into, and the reading of its files."""

    def __init__(self, root: str = SHM_ROOT) -> None:
        base = root if os.path.isdir(root) and os.access(root, os.W_OK) else tempfile.gettempdir()
        _remove_orphans(base)
        self.path = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base)

    def read(self, handle: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of a file the worker wrote, as views of its private mapping; the file is unlinked here."""
        name = str(handle["file"])
        if os.sep in name or not name.endswith(FILE_SUFFIX):
            raise ValueError(f"not a handoff file: {name!r}")
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.unlink(path)  # the mapping keeps the pages; nothing is left behind if reading fails below
            mapped = mmap.mmap(fd, int(handle["size"]), access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        tensors = {}
        for hook, (dtype, shape, offset) in handle["tensors"].items():
            torch_type = torch_dtype(dtype)
            count = math.prod(int(dim) for dim in shape)
            if count == 0:
                tensors[hook] = torch.empty(shape, dtype=torch_type)
                continue
            # a copy-on-write mapping is writable: torch takes it without a "not writable" warning
            tensors[hook] = torch.frombuffer(mapped, dtype=torch_type, count=count, offset=int(offset)).reshape(shape)
        return tensors

    def close(self) -> None:
        """Remove the directory and any file a result that was never read left in it."""
        shutil.rmtree(self.path, ignore_errors=True)
