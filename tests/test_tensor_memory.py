"""The SDK's memory for received tensors (`interpgw_client.tensor_memory`): huge-page blocks shared by large tensors."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import numpy as np
import pytest

from interpgw_client import tensor_memory
from interpgw_client.tensor_memory import ALIGN_BYTES, BLOCK_BYTES, POOLED_MIN_BYTES, TensorMemory
from interpgw_client.tensors import decode

MiB = 2**20
needs_huge_pages = pytest.mark.skipif(
    not tensor_memory.huge_pages_available(), reason="the kernel offers no transparent huge pages"
)


def _address(buffer: bytearray | np.ndarray) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def _mapping_of(address: int) -> tuple[int, int, list[str]]:
    """(start, end, VmFlags) of this process's mapping that holds `address`, from /proc/self/smaps."""
    found = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            start, end = int(span[1], 16), int(span[2], 16)
            current = (start, end) if start <= address < end else None
        elif line.startswith("VmFlags:") and current is not None:
            found = (*current, line.split()[1:])
    assert found is not None, f"no mapping holds {address:#x}"
    return found


def _mmap_of(array: np.ndarray) -> object:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base


@needs_huge_pages
def test_large_tensors_share_aligned_blocks_advised_for_huge_pages() -> None:
    memory = TensorMemory()
    sizes = [1_578_240] * 7 + [POOLED_MIN_BYTES, 3 * MiB + 5]  # e.g. 685 positions x 576 float32, then odd sizes
    buffers = [memory.take(n) for n in sizes]
    assert all(isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.flags.writeable for b in buffers)
    assert [len(b) for b in buffers] == sizes
    spans = sorted((_address(b), _address(b) + len(b)) for b in buffers)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))  # disjoint
    assert all(start % ALIGN_BYTES == 0 for start, _ in spans)
    blocks = {id(_mmap_of(b)) for b in buffers}
    assert len(blocks) == 2  # 5 x 1.5 MiB fill the first 8 MiB block; 2 more, 256 KiB and 3 MiB fit the second
    for buffer in buffers:
        start, end, flags = _mapping_of(_address(buffer))
        assert "hg" in flags, flags  # madvise(MADV_HUGEPAGE) on the block
    first = _address(buffers[0])
    assert first % tensor_memory.HUGE_PAGE_BYTES == 0  # a block starts on a huge-page boundary


@needs_huge_pages
def test_small_tensors_get_their_own_memory_and_huge_ones_their_own_block() -> None:
    memory = TensorMemory()
    small = memory.take(POOLED_MIN_BYTES - 1)
    assert isinstance(small, bytearray) and len(small) == POOLED_MIN_BYTES - 1
    huge = memory.take(BLOCK_BYTES + 1)
    assert isinstance(huge, np.ndarray) and len(huge) == BLOCK_BYTES + 1
    assert _address(huge) % tensor_memory.HUGE_PAGE_BYTES == 0
    after = memory.take(MiB)  # the huge tensor did not use the block being filled
    assert _mmap_of(after) is not _mmap_of(huge)


def test_without_huge_pages_every_tensor_gets_its_own_bytearray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_memory, "huge_pages_available", lambda: False)
    memory = TensorMemory()
    buffers = [memory.take(n) for n in (10, 2 * MiB, 20 * MiB)]
    assert all(isinstance(b, bytearray) for b in buffers)
    assert [len(b) for b in buffers] == [10, 2 * MiB, 20 * MiB]


@needs_huge_pages
@pytest.mark.parametrize("as_torch", [False, True])
def test_a_block_lives_while_any_of_its_tensors_does(as_torch: bool) -> None:
    if as_torch:
        pytest.importorskip("torch")
    memory = TensorMemory()
    buffers = [memory.take(MiB) for _ in range(4)]
    for i, buffer in enumerate(buffers):
        buffer[:] = i + 1
    block = weakref.ref(_mmap_of(buffers[0]))
    kept = decode("float32", (2, MiB // 8), buffers[2], as_torch)
    del buffers, buffer, memory
    gc.collect()
    assert block() is not None  # `kept` holds the block
    view = np.asarray(kept).view(np.uint8) if not as_torch else kept.view(dtype=__import__("torch").uint8).numpy()
    assert (view == 3).all()  # its bytes are intact after its siblings are gone
    kept[0, 0] = 1.0  # and writable
    del kept, view
    gc.collect()
    assert block() is None  # the last tensor gone, the block is unmapped
