"""`keep_freed_memory`: freed memory stays in the process for reuse (glibc), and child processes get the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MiB = 2**20

SCRIPT = """
import json, os, sys
import psutil
from interpgw_client.allocator import keep_freed_memory

applied = keep_freed_memory(512 * 2**20) if sys.argv[1] == "keep" else False
rss = lambda: psutil.Process().memory_info().rss
base = rss()
blocks = [bytearray(b"x") * 2**20 for _ in range(200)]  # 200 MiB in 1 MiB blocks, every page written
peak = rss()
del blocks
after = rss()
child = sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES', ''))"
import subprocess
print(json.dumps({"applied": applied, "base": base, "peak": peak, "after": after,
                  "child_tunables": subprocess.run(child, capture_output=True, text=True).stdout.strip()}))
"""


def run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_memory_is_kept_for_reuse_and_children_inherit_the_setting() -> None:
    default, kept = run("default"), run("keep")
    assert default["peak"] - default["base"] > 150 * MiB and kept["peak"] - kept["base"] > 150 * MiB
    # glibc's defaults give the 200 freed MiB back to the kernel; kept, they stay resident for the next request
    assert default["after"] < default["base"] + 50 * MiB, default
    assert kept["applied"] and kept["after"] > kept["peak"] - 50 * MiB, kept
    assert not default["child_tunables"]
    assert kept["child_tunables"] == "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=536870912"


def test_nothing_is_changed_for_a_non_positive_budget() -> None:
    from interpgw_client.allocator import keep_freed_memory

    before = os.environ.get("GLIBC_TUNABLES")
    assert keep_freed_memory(0) is False and os.environ.get("GLIBC_TUNABLES") == before
