"""`keep_freed_memory`: freed memory stays in the process for reuse (glibc), and so it does in processes it starts
afterwards, forked or executed (vLLM starts its engine processes one way or the other)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gateway_process import GatewayProcess

MiB = 2**20

MEASURE = """
def measure():
    import psutil
    rss = lambda: psutil.Process().memory_info().rss
    base = rss()
    blocks = [bytearray(b"x") * 2**20 for _ in range(200)]  # 200 MiB in 1 MiB blocks, every page written
    peak = rss()
    del blocks
    return {"base": base, "peak": peak, "after": rss()}
"""

SCRIPT = (
    MEASURE
    + """
import json, os, subprocess, sys
from interpgw_client.allocator import keep_freed_memory

applied = keep_freed_memory(512 * 2**20) if sys.argv[1] == "keep" else False
result = {"applied": applied}
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, json.dumps(measure()).encode())
    os._exit(0)
os.wait()
result["forked"] = json.loads(os.read(read, 4096))
child = subprocess.run([sys.executable, "-c", sys.argv[2] + "import json; print(json.dumps(measure()))"],
                       capture_output=True, text=True, check=True)
result["executed"] = json.loads(child.stdout)
result["self"] = measure()  # last: a forked child would start with this process's kept memory
result["tunables"] = os.environ.get("GLIBC_TUNABLES", "")
print(json.dumps(result))
"""
)


def run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, MEASURE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_freed_memory_is_kept_for_reuse_here_and_in_forked_and_executed_children() -> None:
    default, kept = run("default"), run("keep")
    assert kept["applied"] and not default["tunables"]
    assert kept["tunables"] == (
        "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=536870912:glibc.malloc.arena_max=2"
    )
    for process in ("self", "forked", "executed"):
        d, k = default[process], kept[process]
        assert d["peak"] - d["base"] > 150 * MiB and k["peak"] - k["base"] > 150 * MiB
        # glibc's defaults give the 200 freed MiB back to the kernel; kept, they stay for the next request
        assert d["after"] < d["base"] + 50 * MiB, (process, d)
        assert k["after"] > k["peak"] - 50 * MiB, (process, k)


def test_nothing_is_changed_for_a_non_positive_budget() -> None:
    from interpgw_client.allocator import keep_freed_memory

    before = os.environ.get("GLIBC_TUNABLES")
    assert keep_freed_memory(0) is False and os.environ.get("GLIBC_TUNABLES") == before


def test_the_gateway_keeps_freed_memory_by_default(tiny_gateway: GatewayProcess) -> None:
    # (vLLM's engine processes are forked or executed after this: the first test covers both ways.)
    assert "malloc: keeping up to 256 MiB of freed memory for reuse" in tiny_gateway.log_path.read_text()
