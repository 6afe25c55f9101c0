"""glibc malloc settings for a process that moves tens of MiB per request (the gateway, or a client reading traces).

By default glibc hands large freed blocks back to the kernel: blocks over its mmap threshold, and free memory at
the heap's top over its trim threshold (both adapt between 128 KiB and 32-64 MiB). The next request's buffers then
fault in fresh zeroed pages, 4 KiB at a time. On the 2-core VMs here copying 45 MiB into fresh memory takes
27-31 ms, into memory that was freed and is reused 6 ms; a 45 MiB cached trace is copied several times between
Redis and the client's arrays, so page faults were most of a cache hit (docs/benchmarks.md, activation cache).

`keep_freed_memory` makes the process keep up to `trim_bytes` of freed memory for reuse and take every block up to
32 MiB (the largest mmap threshold glibc accepts on 64-bit) from its heaps. The same settings reach processes it
starts afterwards (vLLM's engine) through GLIBC_TUNABLES. It is what allocators such as tcmalloc, which vLLM's CPU
guide recommends preloading, do by default. The cost: freed memory stays in the process's resident set after a
large request, up to `trim_bytes` per malloc arena; the arenas are limited to ARENA_MAX (glibc would otherwise
create up to 8 per core for threads that allocate at once), so a process keeps at most ARENA_MAX * `trim_bytes`.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 * 2**20
ARENA_MAX = 2
DEFAULT_KEEP_BYTES = 256 * 2**20


def keep_freed_memory(trim_bytes: int = DEFAULT_KEEP_BYTES) -> bool:
    """Keep up to `trim_bytes` of freed memory in this process (and its later children) for reuse.

    Returns True when applied; False where malloc is not glibc's (musl, macOS) or `trim_bytes` <= 0, and then
    nothing is changed. A GLIBC_TUNABLES already in the environment is left as it is.
    """
    if trim_bytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim_bytes = min(trim_bytes, 2**31 - 1)
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, trim_bytes), (M_ARENA_MAX, ARENA_MAX))
    if not all(mallopt(parameter, value) == 1 for parameter, value in settings):
        return False
    os.environ.setdefault(
        "GLIBC_TUNABLES",
        f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD_MAX}:glibc.malloc.trim_threshold={trim_bytes}"
        f":glibc.malloc.arena_max={ARENA_MAX}",
    )
    return True
