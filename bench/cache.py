"""Activation cache: latency of a cache hit against recomputing the same trace, for a ~1 MB and a ~50 MB trace.

One gateway process (default model, bf16 weights, captures returned as float32) with its cache in the real
Redis (`--redis-url`, a key prefix of its own, deleted at the end) or in process memory (`--backend memory`).
Each trace is timed end to end through the SDK (request, engine or cache, streaming to the client, decoding):

  recompute   cache="bypass": the engine runs the forward pass and captures every time
  hit         cache="use" after the entry was written: served from the cache, the engine is not involved

The ~1 MB trace captures all 30 `hook_resid_post` at the 15 positions of a short prompt; the ~50 MB one the same
hooks at ~720 positions. Goal (issue 4): a hit at least 10x faster than recomputing the large trace. Run from
the repository root:

    .venv/bin/python bench/cache.py                       # Redis at 127.0.0.1:6379, 9 timed runs after a warm-up
    .venv/bin/python bench/cache.py --backend memory --repeats 3
    .venv/bin/python bench/cache.py --client-keeps-freed-memory   # the client calls keep_freed_memory()
    .venv/bin/python bench/cache.py --redis-only          # no in-process copy in front of Redis: every hit reads Redis

With Redis, the gateway keeps the entries it wrote or read in its own memory as well (`--cache-max-bytes`, the near
cache), so a repeated trace on the same replica is served from there; `--redis-only` starts it with
`--cache-max-bytes 0`, which is what a hit on another replica (whose memory does not hold the entry) costs.

The gateway keeps freed memory for reuse by default (`--malloc-keep-mib`); a client process does so only when it
calls `interpgw_client.keep_freed_memory()`, which this benchmark does with `--client-keeps-freed-memory`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden gate. "


def timed(fn, repeats: int) -> list[float]:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("redis", "memory"), default="redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, default=BENCH / "cache.json")
    parser.add_argument("--client-keeps-freed-memory", action="store_true", help="call keep_freed_memory() here")
    parser.add_argument("--redis-only", action="store_true", help="no in-process cache in front of Redis")
    args = parser.parse_args()

    import redis

    from gateway_process import GatewayProcess
    from interpgw_client import Client, keep_freed_memory

    if args.client_keeps_freed_memory:
        inherited = "GLIBC_TUNABLES" in os.environ
        assert keep_freed_memory(), "keep_freed_memory() needs glibc"
        if not inherited:
            del os.environ["GLIBC_TUNABLES"]  # the gateway runs with its own default (--malloc-keep-mib)

    prefix = f"interpgw-bench-{uuid.uuid4().hex[:8]}:"
    extra = ("--redis-url", args.redis_url, "--redis-prefix", prefix) if args.backend == "redis" else ()
    if args.redis_only:
        assert args.backend == "redis", "--redis-only is for the Redis backend"
        extra += ("--cache-max-bytes", "0")
    gateway = GatewayProcess("--max-capture-bytes", str(1024 * 2**20), *extra, startup_timeout=600)
    report: dict = {
        "backend": args.backend,
        "repeats": args.repeats,
        "client_keeps_freed_memory": args.client_keeps_freed_memory,
        "near_cache": args.backend == "redis" and not args.redis_only,
        "traces": {},
    }
    try:
        with Client(gateway.address, timeout=600) as client:
            hooks = [f"blocks.{i}.hook_resid_post" for i in range(client.model_info().n_layers)]
            prompts = {"1MB": "The capital of France is the city of Paris.", "50MB": SENTENCE * 36}
            for name, prompt in prompts.items():

                def trace(cache: str, p: str = prompt) -> object:
                    return client.trace(p, hooks, dtype="float32", cache=cache)[0]

                first = trace("refresh")  # computes and writes the entry
                nbytes = sum(a.nbytes for a in first.activations.values())
                recompute = timed(lambda: trace("bypass"), args.repeats)
                assert trace("use").cache_hit  # untimed warm-up, as "refresh" was for the recomputes
                hits = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = trace("use")
                    hits.append(time.perf_counter() - start)
                    assert result.cache_hit, "expected a cache hit"
                entry = {
                    "tokens": len(first.token_ids),
                    "bytes": nbytes,
                    "recompute_s": statistics.median(recompute),
                    "hit_s": statistics.median(hits),
                    "recompute_runs": recompute,
                    "hit_runs": hits,
                }
                entry["speedup"] = entry["recompute_s"] / entry["hit_s"]
                report["traces"][name] = entry
                print(
                    f"{name}: {len(first.token_ids)} tokens x {len(hooks)} hooks = {nbytes / 2**20:.1f} MiB; "
                    f"recompute {entry['recompute_s'] * 1000:.0f} ms, hit {entry['hit_s'] * 1000:.0f} ms, "
                    f"hit is {entry['speedup']:.1f}x faster",
                    flush=True,
                )
    finally:
        gateway.stop()
        if args.backend == "redis":
            client_redis = redis.Redis.from_url(args.redis_url)
            keys = list(client_redis.scan_iter(match=f"{prefix}*"))
            if keys:
                client_redis.delete(*keys)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
