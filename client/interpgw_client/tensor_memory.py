"""Memory for the tensors of one response: large ones are carved out of blocks backed by transparent huge pages.

Why: the first write to a fresh page of memory costs a page fault. On the 2-core VMs here, copying a 45 MiB trace
(30 tensors of 1.5 MiB) into freshly allocated 4 KiB pages takes 25-30 ms, and 7-10 ms when the same bytes go
into 2 MiB huge pages: 512 times fewer faults (docs/benchmarks.md, activation cache). By default glibc gives memory
this large back to the kernel when it is freed, so every large response would pay those faults again.

Huge pages need 2 MiB-aligned memory, and a tensor is rarely a multiple of 2 MiB, so tensors of at least
`POOLED_MIN_BYTES` are placed one after another in blocks of `BLOCK_BYTES` (a larger tensor gets a block of its
own). The trade-off: tensors that share a block share its lifetime. A block is unmapped when the last of its
tensors is freed, so keeping one tensor of a response keeps up to `BLOCK_BYTES` of it; keep `tensor.copy()` to let
the rest go. Smaller tensors, and every tensor where the kernel offers no transparent huge pages, get memory of
their own as before.
"""

from __future__ import annotations

import mmap
from functools import cache
from pathlib import Path

import numpy as np

HUGE_PAGE_BYTES = 2 * 2**20
BLOCK_BYTES = 8 * 2**20
POOLED_MIN_BYTES = 256 * 2**10
ALIGN_BYTES = 64  # start of each tensor in a block: cache-line aligned, and aligned for every dtype
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@cache
def huge_pages_available() -> bool:
    """Whether madvise(MADV_HUGEPAGE) can give this process huge pages (Linux with THP not set to "never")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def _huge_page_block(nbytes: int) -> np.ndarray:
    """`nbytes` of private anonymous memory starting on a huge-page boundary, advised to use huge pages. # [nbytes]"""
    # MAP_PRIVATE: Python's default, MAP_SHARED, is shared memory, which transparent huge pages usually exclude
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(mapping, dtype=np.uint8)  # keeps `mapping` alive; unmapped when the last view is freed
    start = -whole.ctypes.data % HUGE_PAGE_BYTES
    mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)  # the unused head and tail are never touched: not resident
    return whole[start : start + nbytes]


class TensorMemory:
    """Hands out the writable buffers that one response's tensors are received into."""

    def __init__(self, block_bytes: int = BLOCK_BYTES, pooled_min_bytes: int = POOLED_MIN_BYTES) -> None:
        self.block_bytes = block_bytes
        self.pooled_min_bytes = pooled_min_bytes
        self._pooling = huge_pages_available()
        self._block: np.ndarray | None = None  # the block being filled  # [block_bytes] uint8
        self._used = 0  # bytes of it handed out, alignment included

    def take(self, nbytes: int) -> bytearray | np.ndarray:
        """A writable buffer of `nbytes` (contents undefined for a block's, zeros for a bytearray)."""
        if not self._pooling or nbytes < self.pooled_min_bytes:
            return bytearray(nbytes)
        if nbytes >= self.block_bytes:
            return _huge_page_block(nbytes)
        start = -(-self._used // ALIGN_BYTES) * ALIGN_BYTES
        if self._block is None or start + nbytes > self.block_bytes:
            self._block, start = _huge_page_block(self.block_bytes), 0
        self._used = start + nbytes
        return self._block[start : self._used]
