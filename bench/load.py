"""Load benchmark: N concurrent streaming clients for a fixed time, mixing generate / trace / steer (loopback only).

Each client is one asyncio task with its own `AsyncClient`, so its own channel and HTTP/2 connection, as N
independent users would have (one shared channel would multiplex every stream over one connection and hide
per-connection costs on the server). A client sends one request at a time until the deadline, the kind drawn by a
seeded RNG (`--mix`, weights generate/trace/steer):

  generate  a streamed `generate` (tokens counted as they arrive, ignore_eos so each yields `--max-tokens`)
  trace     one prompt, `blocks.{L}.hook_resid_post` of one or two layers, last position (cache bypassed by default
            so every trace runs the engine)
  steer     a streamed `generate` with an `add` intervention of a vector made once at start with
            `steering.create` (a random unit vector of d_model, scale `--steer-scale`)

Requests started in the first `--warmup` seconds are excluded from the statistics. After the deadline the
requests in flight get up to `--drain` seconds to end; what is still in flight then is "lost" (neither completed
nor raised a status). RESOURCE_EXHAUSTED (load shed by the server) is expected but reported; any other non-OK
status, or a stream whose streamed tokens disagree with its final message, is an unexpected error. Server RSS is
the gateway process plus all its children (vLLM's engine processes), before warm-up, after it, every 10 s, and at
the end. Goals: zero unexpected errors, zero lost, RSS growth under 5% from after warm-up to the end.

The gateway is started here (default model, bf16, `--max-num-seqs max(64, clients)`) unless `--address` names a
running one (with authentication on, the SDK takes the key from $INTERPGW_API_KEY). The load generator shares
the machine with the server: on a small machine its own CPU use counts against the server's.
Run from the repository root:

    .venv/bin/python bench/load.py                                   # 64 clients, 30 s warm-up + 300 s
    .venv/bin/python bench/load.py --clients 8 --duration 20 --warmup 5 --out /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import math
import os
import platform
import random
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from interpgw_client import AsyncClient, InterpgwError, Intervention

BENCH = Path(__file__).resolve().parent
KINDS = ("generate", "trace", "steer")
STREAMED = ("generate", "steer")
RSS_SAMPLE_S = 10.0
RSS_GROWTH_GOAL = 0.05
EXPECTED_REFUSAL = "RESOURCE_EXHAUSTED"

sys.path.insert(0, str(BENCH))
from trace_throughput import FALLBACK_PROMPTS as PROMPTS  # noqa: E402 - the benchmarks share one prompt set


@dataclass
class Record:
    """One request: what it was, when it ran, how it ended."""

    kind: str
    start: float
    measured: bool  # started after the warm-up
    end: float = 0.0
    first_token: float | None = None
    tokens: int = 0
    code: str = ""
    message: str = ""
    retry_after: float | None = None  # the server's hint with RESOURCE_EXHAUSTED


@dataclass
class Plan:
    """What every client shares: the server, the request shapes and the clock boundaries."""

    address: str
    model: str
    n_layers: int
    steer_hook: str
    steer_vector: str
    args: argparse.Namespace
    measure_start: float
    deadline: float
    weights: tuple[float, float, float]
    ids: itertools.count = field(default_factory=itertools.count)
    in_flight: dict[int, Record] = field(default_factory=dict)
    done: list[Record] = field(default_factory=list)


# ---------------------------------------------------------------------- requests


async def one_request(client: Any, kind: str, rng: random.Random, plan: Plan) -> Record:
    """Run one request of `kind`; the record is filed as done unless the task is cancelled (then it stays in
    flight and counts as lost)."""
    args = plan.args
    now = time.monotonic()
    record = Record(kind=kind, start=now, measured=now >= plan.measure_start)
    rid = next(plan.ids)
    plan.in_flight[rid] = record
    prompt = rng.choice(PROMPTS)
    try:
        if kind == "trace":
            layers = sorted(rng.sample(range(plan.n_layers), rng.choice((1, 2))))
            hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
            result = await client.trace(prompt, hooks, positions="last", model=plan.model, cache=args.trace_cache)
            shapes = {hook: tuple(result[0].activations[hook].shape) for hook in hooks if hook in result[0].activations}
            if len(shapes) != len(hooks) or any(shape[0] != 1 for shape in shapes.values()):
                record.code, record.message = "BAD_RESULT", f"trace of {hooks} came back with {shapes}"
        else:
            interventions = None
            if kind == "steer":
                interventions = [Intervention("add", plan.steer_hook, plan.steer_vector, scale=args.steer_scale)]
            stream = client.generate_stream(
                prompt,
                model=plan.model,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                ignore_eos=True,
                interventions=interventions,
            )
            async for event in stream:
                if event.token_ids and record.first_token is None:
                    record.first_token = time.monotonic()
                record.tokens += len(event.token_ids)
            if stream.result is None:
                record.code, record.message = "NO_RESULT", "stream ended without its final message"
            elif len(stream.result.token_ids) != record.tokens:
                record.code = "TOKEN_MISMATCH"
                record.message = f"{record.tokens} tokens streamed, {len(stream.result.token_ids)} in the result"
        record.code = record.code or "OK"
    except InterpgwError as exc:
        record.code, record.message = exc.code.name, exc.details
        record.retry_after = getattr(exc, "retry_after", None)  # set by the SDK on ResourceExhaustedError
    except Exception as exc:  # noqa: BLE001 - an SDK or transport failure is a result of the benchmark
        record.code, record.message = f"CLIENT_{type(exc).__name__}", str(exc)
    record.end = time.monotonic()
    del plan.in_flight[rid]
    plan.done.append(record)
    return record


async def client_loop(index: int, plan: Plan) -> None:
    """One user: requests back to back until the deadline; after a load-shedding refusal it waits as the server
    asked (at most 5 s), else 0.5-1.5 s."""
    rng = random.Random(f"{plan.args.seed}:{index}")
    async with AsyncClient(plan.address) as client:
        while time.monotonic() < plan.deadline:
            record = await one_request(client, rng.choices(KINDS, plan.weights)[0], rng, plan)
            if record.code == EXPECTED_REFUSAL:
                hint = record.retry_after
                await asyncio.sleep(min(hint, 5.0) if hint is not None else rng.uniform(0.5, 1.5))


# ---------------------------------------------------------------------- server memory


def server_rss(pid: int | None) -> dict[str, int]:
    """Resident bytes of the process and each descendant (vLLM's engine core and workers), keyed "pid name"; empty
    when there is no such process. Summed, shared pages count once per process: a trend, not a footprint."""
    if pid is None:
        return {}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    rss = {}
    for process in processes:
        try:
            rss[f"{process.pid} {process.name()}"] = process.memory_info().rss
        except psutil.NoSuchProcess:
            pass  # a child that ended between listing and reading
    return rss


def total(rss: dict[str, int]) -> int | None:
    return sum(rss.values()) if rss else None


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port (a gateway started elsewhere), if this user may see it."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.AccessDenied:
        pass
    return None


async def sample_rss(pid: int | None, t0: float, samples: list[tuple[float, int | None]]) -> None:
    while True:
        samples.append((round(time.monotonic() - t0, 1), total(server_rss(pid))))
        await asyncio.sleep(RSS_SAMPLE_S)


# ---------------------------------------------------------------------- the run


async def run_load(address: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncClient(address) as setup:
        await setup.wait_ready(timeout=120.0)
        info = await setup.model_info()
        steer_hook = f"blocks.{info.n_layers // 3}.hook_resid_post"
        direction = np.random.default_rng(args.seed).standard_normal(info.d_model).astype(np.float32)
        vector = await setup.steering.create(direction / np.linalg.norm(direction), steer_hook, name="bench-load")
        t0 = time.monotonic()
        rss_samples: list[tuple[float, int | None]] = []
        sampler = asyncio.create_task(sample_rss(pid, t0, rss_samples))
        rss = {"before_warmup": server_rss(pid)}
        plan = Plan(
            address=address,
            model=info.id,
            n_layers=info.n_layers,
            steer_hook=steer_hook,
            steer_vector=vector.id,
            args=args,
            measure_start=t0 + args.warmup,
            deadline=t0 + args.warmup + args.duration,
            weights=args.mix,
        )
        _log(f"{args.clients} clients on {address} ({info.id}): {args.warmup:g} s warm-up, then {args.duration:g} s")
        clients = [asyncio.create_task(client_loop(i, plan)) for i in range(args.clients)]
        await asyncio.sleep(args.warmup)
        rss["start"] = server_rss(pid)
        await asyncio.sleep(max(0.0, plan.deadline - time.monotonic()))
        _log(f"deadline reached: {len(plan.in_flight)} requests in flight, waiting up to {args.drain:g} s")
        _, pending = await asyncio.wait(clients, timeout=args.drain)
        lost = list(plan.in_flight.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        rss["end"] = server_rss(pid)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        rss_samples.append((round(time.monotonic() - t0, 1), total(rss["end"])))
        try:
            await setup.steering.delete(vector.id)
        except InterpgwError as exc:  # the results matter more than the clean-up
            _log(f"could not delete steering vector {vector.id}: {exc}")
    return summarize(plan, lost, rss, rss_samples)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolated between closest ranks, to 0.1; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 1)


def summarize(
    plan: Plan,
    lost: list[Record],
    rss: dict[str, dict[str, int]],
    rss_samples: list[tuple[float, int | None]],
) -> dict[str, Any]:
    measured = [r for r in plan.done if r.measured]
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        rows = [r for r in measured if r.kind == kind]
        ok = [r for r in rows if r.code == "OK"]
        latency = [(r.end - r.start) * 1000 for r in ok]
        ttft = [(r.first_token - r.start) * 1000 for r in ok if r.first_token is not None]
        kinds[kind] = {
            "count": len(rows),
            "ok": len(ok),
            "latency_ms": {f"p{q}": percentile(latency, q) for q in (50, 95, 99)},
            "ttft_ms": {f"p{q}": percentile(ttft, q) for q in (50, 95)} if kind in STREAMED else None,
            "tokens": sum(r.tokens for r in ok),
        }
    span = max((r.end for r in measured), default=plan.deadline) - plan.measure_start
    codes = Counter(r.code for r in measured if r.code != "OK")
    messages: dict[str, list[str]] = defaultdict(list)
    for r in measured:
        if r.code != "OK" and r.message not in messages[r.code] and len(messages[r.code]) < 5:
            messages[r.code].append(r.message)
    unexpected = sum(n for code, n in codes.items() if code != EXPECTED_REFUSAL)
    start, end = total(rss["start"]), total(rss["end"])
    growth = (end - start) / start if start and end else None
    goals = {
        "zero_unexpected_errors": unexpected == 0,
        "zero_lost": not lost,
        "rss_growth_under_5pct": None if growth is None else growth < RSS_GROWTH_GOAL,
    }
    return {
        "kinds": kinds,
        "requests": len(measured),
        "requests_per_s": len(measured) / span if span > 0 else None,
        "tokens_per_s": sum(k["tokens"] for k in kinds.values()) / span if span > 0 else None,
        "measured_seconds": span,
        "errors_by_code": dict(codes),
        "error_messages": dict(messages),
        "expected_refusals": codes.get(EXPECTED_REFUSAL, 0),
        "unexpected_errors": unexpected,
        "lost": len(lost),
        "lost_requests": [{"kind": r.kind, "age_s": time.monotonic() - r.start, "tokens": r.tokens} for r in lost],
        "warmup_requests": len(plan.done) - len(measured),
        "rss_bytes": {name: total(by_process) for name, by_process in rss.items()} | {"growth": growth},
        "rss_by_process": rss,
        "rss_samples": [{"t_s": t, "rss_bytes": value} for t, value in rss_samples],
        "goals": goals,
        "passed": all(v is True for v in goals.values()),
    }


# ---------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.clients} clients, {summary['measured_seconds']:.0f} s measured after {args.warmup:g} s warm-up")
    header = (
        f"{'kind':<9} {'count':>6} {'ok':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'ttft p50':>9} {'ttft p95':>9}"
    )
    print(header)
    print("-" * len(header))
    for kind, k in summary["kinds"].items():
        lat, ttft = k["latency_ms"], k["ttft_ms"] or {}
        print(
            f"{kind:<9} {k['count']:>6} {k['ok']:>6} {_ms(lat['p50']):>8} {_ms(lat['p95']):>8} {_ms(lat['p99']):>8} "
            f"{_ms(ttft.get('p50')):>9} {_ms(ttft.get('p95')):>9}"
        )
    rate = summary["tokens_per_s"]
    print(f"\ngenerated tokens/s: {rate:.1f}" if rate is not None else "\ngenerated tokens/s: n/a")
    print(f"requests/s:         {summary['requests_per_s'] or 0:.2f}")
    errors = summary["errors_by_code"]
    print(f"errors by code:     {', '.join(f'{c} {n}' for c, n in sorted(errors.items())) if errors else 'none'}")
    for code, texts in summary["error_messages"].items():
        for text in texts:
            print(f"  {code}: {text[:200]}")
    print(f"load shed (RESOURCE_EXHAUSTED, expected): {summary['expected_refusals']}")
    print(f"lost (in flight {args.drain:g} s after the deadline): {summary['lost']}")
    rss = summary["rss_bytes"]
    growth = "n/a" if rss["growth"] is None else f"{rss['growth'] * 100:+.2f}%"
    print(
        f"server RSS:         before warm-up {_mib(rss['before_warmup'])}, start {_mib(rss['start'])}, "
        f"end {_mib(rss['end'])}, growth {growth}"
    )
    goals = summary["goals"]
    print("\ngoals:")
    print(f"  zero unexpected errors  {'PASS' if goals['zero_unexpected_errors'] else 'FAIL'}")
    print(f"  zero lost               {'PASS' if goals['zero_lost'] else 'FAIL'}")
    rss_goal = goals["rss_growth_under_5pct"]
    print(f"  RSS growth < 5%         {'not measured' if rss_goal is None else 'PASS' if rss_goal else 'FAIL'}")
    print(f"\nRESULT: {'PASS' if summary['passed'] else 'FAIL'}")


# ---------------------------------------------------------------------- entry point


def loopback_address(address: str) -> str:
    """`address` if every address its host resolves to is a loopback one; else an error naming it."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--address is HOST:PORT, got {address!r}")
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)}
    except socket.gaierror as exc:
        raise argparse.ArgumentTypeError(f"cannot resolve {host!r}: {exc}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in resolved):
        raise argparse.ArgumentTypeError(
            f"{address!r} resolves to {sorted(resolved)}: this load generator only targets loopback addresses"
        )
    return address


def mix(text: str) -> tuple[float, float, float]:
    parts = text.replace("/", ",").split(",")
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        weights = ()
    if len(weights) != 3 or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise argparse.ArgumentTypeError(f"--mix is three weights generate/trace/steer, e.g. 50/25/25; got {text!r}")
    return weights[0], weights[1], weights[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=300.0, help="measured seconds (default 300)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before measuring (default 30)")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds in-flight requests get after the end")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per generate/steer (default 32)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--steer-scale", type=float, default=4.0, help="scale of the unit steering vector")
    parser.add_argument("--mix", type=mix, default=(50.0, 25.0, 25.0), help="weights generate/trace/steer (50/25/25)")
    parser.add_argument("--trace-cache", choices=("bypass", "use"), default="bypass", help="trace cache mode")
    parser.add_argument("--model", default="default", help="model the started gateway serves (default: its own)")
    parser.add_argument("--address", type=loopback_address, help="a running gateway (loopback) instead of one here")
    parser.add_argument("--server-pid", type=int, help="with --address: the gateway's pid for RSS (default: found)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BENCH / "load.json", help="JSON results (default bench/load.json)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.drain < 0 or args.max_tokens < 1:
        parser.error("need --clients >= 1, --duration > 0, --warmup >= 0, --drain >= 0 and --max-tokens >= 1")
    return args


def start_gateway(args: argparse.Namespace) -> Any:
    """A gateway on a free loopback port, stopped (with its process group) even if start-up is interrupted."""
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from gateway_process import GatewayProcess
    from interpgw.models.default_model import ensure_default_model

    model = ["--model", args.model] if args.model != "default" else []
    if not model:
        ensure_default_model()  # convert once before the start-up timeout counts
    flags = ["--dtype", "bfloat16", "--max-num-seqs", str(max(64, args.clients)), *model]
    _log(f"starting a gateway: {' '.join(flags)}")
    return GatewayProcess(*flags, startup_timeout=600.0)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, through the `finally` that stops the gateway."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load_before = os.getloadavg()
    gateway = None if args.address else start_gateway(args)
    try:
        if gateway is not None:
            address, pid = gateway.address, gateway.process.pid
        else:
            address = args.address
            pid = args.server_pid or listening_pid(int(address.rpartition(":")[2]))
            if pid is None:
                _log("server pid not found (pass --server-pid): RSS not measured")
        summary = asyncio.run(run_load(address, pid, args))
    except BaseException:
        if gateway is not None:
            _log(f"gateway log tail:\n{gateway.log_tail(30)}")
        raise
    finally:
        if gateway is not None:
            gateway.stop()
    report(summary, args)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "server_pid") and not isinstance(v, Path)}
        | {"started_gateway": gateway is not None, "kinds": list(KINDS)},
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        **summary,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
