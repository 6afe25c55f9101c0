"""Generation throughput with and without activation capture: the gateway against plain vLLM and local peers.

Every configuration generates `--new-tokens` tokens greedily for the same `--prompts` prompts (bf16, the default
SmolLM2-135M-Instruct folder), forced past end-of-sequence so each request yields exactly that many tokens
(vLLM `ignore_eos`, the SDK's `ignore_eos` where it has one, transformers `min_new_tokens`). Tokens/s is computed
from the tokens actually generated, and a shortfall is reported.

  vllm         (a) plain `vllm.LLM.generate`, all prompts in one batch, the gateway's engine settings
  gateway      (b) a real gateway process, all requests at once through one AsyncClient:
                   b0 no capture, b1 `blocks.15.hook_resid_post`, b2 every layer's `hook_resid_post`
                   (positions "all", generated tokens included)
  hf, nnsight  (c) local peers at batch N: transformers `generate` plain and with forward hooks that copy every
                   layer's output, and nnsight `generate` with `.save()` on every layer's output at every step
  serving      (d) N SDK clients with one request each, at once, against the same N requests one at a time

The gateway keeps freed memory for reuse by default (`--malloc-keep-mib`, glibc); the plain vLLM, transformers and
nnsight sections get the same allocator settings (`interpgw_client.keep_freed_memory()` at the start of their
worker, which vLLM's engine process inherits), so the comparison is of the code and not of glibc's defaults. The
SDK client of the gateway sections keeps glibc's defaults, as a user's process would.

Each section runs in a fresh worker process (no leftover threads, memory or engine between sections), and only
one engine is alive at a time: two engines on a small CPU machine fight over the cores. Each configuration gets
one untimed warm-up run, then the median of `--repeats` timed runs is reported, with the ratios the project's
goals use. Run from the repository root:

    .venv/bin/python bench/trace_throughput.py                      # full run: 32 prompts x 64 tokens, 3 repeats
    .venv/bin/python bench/trace_throughput.py --prompts 4 --new-tokens 8 --repeats 1 --json /tmp/smoke.json
    .venv/bin/python bench/trace_throughput.py --skip nnsight,serving
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATASET = Path("shared") / "datasets" / "qa_wikidata.jsonl"
ONE_LAYER_HOOK = "blocks.15.hook_resid_post"
SECTIONS = ("vllm", "gateway", "hf", "nnsight", "serving")
SECTION_ALIASES = {"a": ("vllm",), "b": ("gateway",), "c": ("hf", "nnsight"), "d": ("serving",)}
# The gateway's engine settings (server/interpgw/config.py), repeated for plain vLLM so that the two match.
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 2.0
ENGINE_SEED = 0

FALLBACK_PROMPTS = (
    "The history of the Roman Empire began when",
    "A good recipe for bread needs flour, water and",
    "The main reason the sky looks blue during the day is",
    "In the middle of the ocean, far from any coast, sailors once",
    "The first computers filled whole rooms and were used to",
    "My favourite season of the year is autumn, because",
    "The city council met on Tuesday to discuss the new",
    "Photosynthesis is the process by which plants",
    "When the train finally arrived at the station, the passengers",
    "The most important rule of writing clear code is",
    "Mount Everest, the highest mountain on Earth, is located",
    "The old library on the hill had thousands of books about",
    "Learning a second language as an adult is hard because",
    "The football match ended in a draw after",
    "Electric cars are becoming popular in many countries since",
    "The scientist looked at the results of the experiment and",
)


# ---------------------------------------------------------------------- shared pieces


@dataclass
class RunStats:
    """One timed run: wall seconds and what it produced (counted, not assumed)."""

    seconds: float
    generated_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    captured_bytes: int = 0
    captured_tensors: int = 0


@dataclass
class ConfigResult:
    """A configuration's timed runs and their median throughput; `error` instead of numbers if it failed."""

    name: str
    label: str
    runs: list[RunStats] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        if self.error or not self.runs:
            return None
        return statistics.median(r.generated_tokens / r.seconds for r in self.runs)

    def summary(self) -> dict[str, Any]:
        rates = [r.generated_tokens / r.seconds for r in self.runs]
        return {
            "label": self.label,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_min": min(rates) if rates else None,
            "tokens_per_s_max": max(rates) if rates else None,
            "median_seconds": statistics.median(r.seconds for r in self.runs) if self.runs else None,
            "error": self.error,
            "note": self.note,
            "runs": [asdict(r) for r in self.runs],
        }


def measure(name: str, label: str, run_once: Callable[[], RunStats], repeats: int, note: str = "") -> ConfigResult:
    """One warm-up run, then `repeats` timed runs; a failure is recorded, not raised, so other configs still run."""
    result = ConfigResult(name=name, label=label, note=note)
    try:
        run_once()
        for _ in range(repeats):
            result.runs.append(run_once())
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        result.error = f"{type(exc).__name__}: {exc}"
        result.runs.clear()
    _log(f"  {name}: " + (f"FAILED {result.error}" if result.error else f"{result.tokens_per_s:.1f} tok/s"))
    return result


def load_prompts(n: int, path: Path | None) -> tuple[list[str], str]:
    """N natural-language prompts: the dataset's first N, else built-in sentences (repeated with a suffix)."""
    candidates = [path] if path else [REPO / DATASET, REPO.parent / DATASET]
    for candidate in candidates:
        if candidate and candidate.is_file():
            prompts = []
            with open(candidate, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        prompts.append(json.loads(line)["prompt"])
                    if len(prompts) == n:
                        break
            if len(prompts) == n:
                return prompts, str(candidate)
    prompts = [
        FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] + ("" if i < len(FALLBACK_PROMPTS) else f" (take {i})")
        for i in range(n)
    ]
    return prompts, "built-in sentences"


def model_dir() -> str:
    from interpgw.models.default_model import ensure_default_model

    return str(ensure_default_model())


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- (a) plain vLLM


def section_vllm(prompts: list[str], new_tokens: int, repeats: int) -> list[ConfigResult]:
    """The engine the gateway wraps, with nothing in between: the ceiling a capture's cost is measured from."""
    # As the gateway's engine sets them (engine/vllm_engine.py): eager V1 runner, no inductor C++ builds.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir(),
        dtype="bfloat16",
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_seqs=max(64, len(prompts)),
        kv_cache_memory_bytes=int(KV_CACHE_GIB * 2**30),
        seed=ENGINE_SEED,
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run_once() -> RunStats:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return RunStats(
            seconds=seconds,
            generated_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
            prompt_tokens=sum(len(o.prompt_token_ids or ()) for o in outputs),
            cached_prompt_tokens=sum(int(o.num_cached_tokens or 0) for o in outputs),
        )

    try:
        return [measure("vllm", "(a) plain vLLM, one batch", run_once, repeats)]
    finally:
        llm.llm_engine.engine_core.shutdown()


# ---------------------------------------------------------------------- (b) and (d): the gateway


def _sdk_supports_ignore_eos() -> bool:
    from interpgw_client import AsyncClient

    return "ignore_eos" in inspect.signature(AsyncClient.generate_stream).parameters


async def interleaved_rounds(
    once: Callable[[str], Awaitable[RunStats]], names: Sequence[str], repeats: int
) -> dict[str, list[RunStats]]:
    """One untimed warm-up round of each configuration, then `repeats` rounds that interleave them, so slow drift
    of the machine hits every configuration alike."""
    runs: dict[str, list[RunStats]] = {n: [] for n in names}
    for name in names:  # warm-up
        await once(name)
    for round_ in range(repeats):
        for name in names:
            stats = await once(name)
            runs[name].append(stats)
            print(f"  round {round_}: {name:9s} {stats.generated_tokens / stats.seconds:7.1f} tok/s", flush=True)
    return runs


def overhead_run(
    description: str, default_json: Path, measure_all: Callable[[str, list[str], int, int], Awaitable[dict]]
) -> tuple[argparse.Namespace, list[str], dict[str, list[RunStats]], dict[str, float]]:
    """The shared frame of the overhead benchmarks: flags, one bf16 gateway, `measure_all(address, prompts,
    new_tokens, repeats)`, and each configuration's median tokens/s."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()

    from gateway_process import GatewayProcess

    prompts, source = load_prompts(args.prompts, None)
    model_dir()
    gateway = GatewayProcess("--dtype", "bfloat16", "--max-num-seqs", str(max(64, len(prompts))), startup_timeout=600)
    try:
        runs = asyncio.run(measure_all(gateway.address, prompts, args.new_tokens, args.repeats))
    finally:
        gateway.stop()
    rate = {name: statistics.median(r.generated_tokens / r.seconds for r in stats) for name, stats in runs.items()}
    print(f"\n{len(prompts)} prompts ({source}) x {args.new_tokens} tokens, median of {args.repeats} rounds")
    return args, prompts, runs, rate


def _result_stats(results: Sequence[Any], seconds: float) -> RunStats:
    tensors = [t for r in results for t in r.activations.values()]
    return RunStats(
        seconds=seconds,
        generated_tokens=sum(len(r.token_ids) for r in results),
        prompt_tokens=sum(len(r.prompt_token_ids) for r in results),
        cached_prompt_tokens=sum(r.cached_prompt_tokens for r in results),
        captured_bytes=sum(t.numel() * t.element_size() for t in tensors),
        captured_tensors=len(tensors),
    )


def section_gateway(
    prompts: list[str], new_tokens: int, repeats: int, run_gateway: bool, run_serving: bool
) -> list[ConfigResult]:
    """Start one gateway process; run (b) and/or (d) against it; always stop it."""
    sys.path.insert(0, str(REPO / "tests"))
    from gateway_process import GatewayProcess

    model_dir()  # convert the default model before the gateway's start-up timeout starts counting
    gateway = GatewayProcess(  # stops itself, process group included, if start-up fails or is interrupted
        "--dtype", "bfloat16", "--max-num-seqs", str(max(64, len(prompts))), startup_timeout=600.0
    )
    try:
        return asyncio.run(_gateway_configs(gateway.address, prompts, new_tokens, repeats, run_gateway, run_serving))
    except BaseException:
        _log(f"gateway log tail:\n{gateway.log_tail(30)}")
        raise
    finally:
        gateway.stop()


async def _gateway_configs(
    address: str, prompts: list[str], new_tokens: int, repeats: int, run_gateway: bool, run_serving: bool
) -> list[ConfigResult]:
    from interpgw_client import AsyncClient

    base: dict[str, Any] = {"max_tokens": new_tokens, "temperature": 0.0}
    if _sdk_supports_ignore_eos():
        base["ignore_eos"] = True
    note = "" if "ignore_eos" in base else "SDK has no ignore_eos: requests may stop early"
    # as_torch: activations stay bf16 torch tensors, as the local peers hand them out (numpy would widen to fp32)
    client = AsyncClient(address, as_torch=True)
    await client.wait_ready(timeout=60.0)
    info = await client.model_info()
    all_layers = [f"blocks.{i}.hook_resid_post" for i in range(info.n_layers)]

    def batch(capture: list[str] | None) -> Callable[[], Awaitable[RunStats]]:
        kwargs = dict(base)
        if capture:
            kwargs.update(capture=capture, positions="all", capture_generated=True)

        async def once() -> RunStats:
            start = time.perf_counter()
            results = await asyncio.gather(*(client.generate(p, **kwargs) for p in prompts))
            return _result_stats(results, time.perf_counter() - start)

        return once

    async def concurrent_clients() -> RunStats:
        # N independent users: each opens its own channel and sends one request
        start = time.perf_counter()

        async def one(prompt: str) -> Any:
            async with AsyncClient(address, as_torch=True) as own:
                return await own.generate(prompt, **base)

        results = await asyncio.gather(*(one(p) for p in prompts))
        return _result_stats(results, time.perf_counter() - start)

    async def one_at_a_time() -> RunStats:
        start = time.perf_counter()
        results = [await client.generate(p, **base) for p in prompts]
        return _result_stats(results, time.perf_counter() - start)

    configs: list[tuple[str, str, Callable[[], Awaitable[RunStats]]]] = []
    if run_gateway:
        configs += [
            ("gateway_b0", "(b0) gateway, no capture", batch(None)),
            ("gateway_b1", f"(b1) gateway, capture {ONE_LAYER_HOOK}", batch([ONE_LAYER_HOOK])),
            ("gateway_b2", f"(b2) gateway, capture all {info.n_layers} resid_post", batch(all_layers)),
        ]
    if run_serving:
        configs += [
            ("serving_concurrent", f"(d) {len(prompts)} concurrent clients", concurrent_clients),
            ("serving_sequential", "(d) one request at a time", one_at_a_time),
        ]
    results = []
    try:
        for name, label, once in configs:
            results.append(await _ameasure(name, label, once, repeats, note))
    finally:
        await client.close()
    return results


async def _ameasure(
    name: str, label: str, once: Callable[[], Awaitable[RunStats]], repeats: int, note: str = ""
) -> ConfigResult:
    """`measure` for coroutines: the event loop must stay the one the client's channel lives on."""
    result = ConfigResult(name=name, label=label, note=note)
    try:
        await once()
        for _ in range(repeats):
            result.runs.append(await once())
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        result.error = f"{type(exc).__name__}: {exc}"
        result.runs.clear()
    _log(f"  {name}: " + (f"FAILED {result.error}" if result.error else f"{result.tokens_per_s:.1f} tok/s"))
    return result


# ---------------------------------------------------------------------- (c) local peers


def _hf_inputs(tokenizer: Any, prompts: list[str]) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _greedy_kwargs(tokenizer: Any, new_tokens: int) -> dict[str, Any]:
    # min_new_tokens = max_new_tokens: every row generates exactly new_tokens (transformers' ignore_eos)
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }


def section_hf(prompts: list[str], new_tokens: int, repeats: int) -> list[ConfigResult]:
    """transformers as a researcher would run it locally: one padded batch, hooks copying every layer's output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    inputs = _hf_inputs(tokenizer, prompts)
    kwargs = _greedy_kwargs(tokenizer, new_tokens)
    prompt_tokens = int(inputs["attention_mask"].sum())
    store: list[torch.Tensor] = []

    def save_output(_module: Any, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        store.append(hidden.detach().to("cpu", copy=True))

    def run_once() -> RunStats:
        store.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start
        return RunStats(
            seconds=seconds,
            generated_tokens=int(out[:, inputs["input_ids"].shape[1] :].numel()),
            prompt_tokens=prompt_tokens,
            captured_bytes=sum(t.numel() * t.element_size() for t in store),
            captured_tensors=len(store),
        )

    results = [measure("hf_plain", "(c) HF generate, no hooks", run_once, repeats)]
    handles = [layer.register_forward_hook(save_output) for layer in model.model.layers]
    try:
        results.append(
            measure(
                "hf_hooks",
                f"(c) HF generate + hooks, all {len(handles)} layers",
                run_once,
                repeats,
                note="includes padding positions",
            )
        )
    finally:
        for handle in handles:
            handle.remove()
    return results


def section_nnsight(prompts: list[str], new_tokens: int, repeats: int) -> list[ConfigResult]:
    """nnsight, the usual local interpretability tool: `.save()` every layer's output at every generation step."""
    try:
        import nnsight
        import torch
        from nnsight import TransformersModel
    except ImportError as exc:
        return [ConfigResult("nnsight", "(c) nnsight generate + save all layers", error=f"not installed: {exc}")]

    lm = TransformersModel(model_dir(), task="text-generation", dispatch=True, dtype=torch.bfloat16)
    kwargs = _greedy_kwargs(lm.tokenizer, new_tokens)
    encoded = _hf_inputs(lm.tokenizer, prompts)  # what nnsight's own batching produces: left-padded
    prompt_tokens, prompt_width = int(encoded["attention_mask"].sum()), int(encoded["input_ids"].shape[1])
    n_layers = len(lm.model.layers)

    def run_once() -> RunStats:
        start = time.perf_counter()
        with lm.generate(prompts, **kwargs) as tracer:
            saved = nnsight.save([])
            for _step in tracer.iter[:new_tokens]:
                for layer in lm.model.layers:
                    saved.append(layer.output)
            ids = tracer.result.save()
        seconds = time.perf_counter() - start
        tensors = [t[0] if isinstance(t, tuple) else t for t in saved]
        if len(tensors) != n_layers * new_tokens:
            raise RuntimeError(f"expected {n_layers * new_tokens} saved outputs, got {len(tensors)}")
        return RunStats(
            seconds=seconds,
            generated_tokens=int(ids.shape[0] * (ids.shape[1] - prompt_width)),
            prompt_tokens=prompt_tokens,
            captured_bytes=sum(t.numel() * t.element_size() for t in tensors),
            captured_tensors=len(tensors),
        )

    label = f"(c) nnsight generate + .save() all {n_layers} layers"
    return [measure("nnsight", label, run_once, repeats, note=f"nnsight {nnsight.__version__}")]


# ---------------------------------------------------------------------- worker and orchestration


def run_worker(section: str, args: argparse.Namespace) -> None:
    """Run one section in this (fresh) process and write its results as JSON."""
    prompts, _ = load_prompts(args.prompts, args.prompts_file)
    skip = set(args.skip)
    if section != "gateway":  # the gateway process applies it itself; see the module docstring
        from interpgw_client import keep_freed_memory

        keep_freed_memory()
    if section == "vllm":
        results = section_vllm(prompts, args.new_tokens, args.repeats)
    elif section == "gateway":
        results = section_gateway(prompts, args.new_tokens, args.repeats, "gateway" not in skip, "serving" not in skip)
    elif section == "hf":
        results = section_hf(prompts, args.new_tokens, args.repeats)
    elif section == "nnsight":
        results = section_nnsight(prompts, args.new_tokens, args.repeats)
    else:
        raise ValueError(section)
    Path(args.worker_out).write_text(json.dumps({r.name: r.summary() for r in results}))


def run_section(section: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run a worker process; kill its whole process group afterwards so no engine process outlives it."""
    fd, out = tempfile.mkstemp(prefix=f"bench-{section}-", suffix=".json")
    os.close(fd)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", section, "--worker-out", out]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        code = process.wait(timeout=args.section_timeout)
    except BaseException as exc:  # timeout, Ctrl-C or SIGTERM: ask nicely (the worker stops its gateway), then kill
        _log(f"stopping the {section} worker ({type(exc).__name__})")
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
        raise
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # leftovers of a finished worker (vLLM engine processes)
    try:
        data = json.loads(Path(out).read_text() or "{}")
    finally:
        os.unlink(out)
    if code != 0 or not data:
        return {"_section_error": f"worker for {section!r} exited with {code}"}
    return data


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def ratio(results: dict[str, Any], num: str, den: str) -> float | None:
    a = (results.get(num) or {}).get("tokens_per_s")
    b = (results.get(den) or {}).get("tokens_per_s")
    return a / b if a and b else None


GOALS = (
    # name, numerator, denominator, goal (ratio must be >= it), what it says
    ("capture_one_layer_vs_vllm", "gateway_b1", "vllm", 0.90, "one-layer capture costs at most 10%"),
    ("gateway_no_capture_vs_vllm", "gateway_b0", "vllm", None, "gateway overhead without capture"),
    ("capture_all_layers_vs_vllm", "gateway_b2", "vllm", None, "all-layer capture vs plain vLLM"),
    ("all_layers_vs_hf_hooks", "gateway_b2", "hf_hooks", 1.0, "all-layer capture ahead of HF + hooks"),
    ("all_layers_vs_nnsight", "gateway_b2", "nnsight", 1.0, "all-layer capture ahead of nnsight"),
    ("all_layers_vs_hf_plain", "gateway_b2", "hf_plain", None, "all-layer capture vs HF without hooks"),
    ("concurrent_vs_sequential", "serving_concurrent", "serving_sequential", 5.0, "N clients at once vs one by one"),
)


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the goal ratios; return the ratios for the JSON."""
    expected = args.prompts * args.new_tokens
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens, greedy, bf16; median of {args.repeats} runs")
    header = f"{'configuration':<50} {'tok/s':>9} {'min':>8} {'max':>8} {'s/run':>7} {'gen tok':>8} {'MB/run':>8}"
    print(header)
    print("-" * len(header))
    for r in results.values():
        if r.get("error"):
            print(f"{r['label']:<50} {'FAILED':>9}  {r['error'][:150]}")
            continue
        run = r["runs"][0]
        line = (
            f"{r['label']:<50} {r['tokens_per_s']:>9.1f} {r['tokens_per_s_min']:>8.1f} {r['tokens_per_s_max']:>8.1f} "
            f"{r['median_seconds']:>7.2f} {run['generated_tokens']:>8d} {run['captured_bytes'] / 2**20:>8.1f}"
        )
        if run["generated_tokens"] != expected:
            line += f"  (expected {expected} tokens)"
        if r.get("note"):
            line += f"  [{r['note']}]"
        print(line)
    ratios: dict[str, Any] = {}
    print()
    for key, num, den, goal, what in GOALS:
        value = ratio(results, num, den)
        ratios[key] = {
            "value": value,
            "goal_min": goal,
            "met": None if value is None or goal is None else value >= goal,
        }
        shown = "n/a" if value is None else f"{value:.3f}"
        verdict = "" if goal is None or value is None else ("  ok" if value >= goal else "  MISSED")
        goal_text = f"goal >= {goal:g}" if goal is not None else "(info)"
        print(f"{what:<42} {shown:>8}  {goal_text:<12}{verdict:<8} ({num} / {den})")
    return ratios


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts N (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    parser.add_argument("--skip", default="", help=f"comma list of sections to skip: {', '.join(SECTIONS)} (or a-d)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--prompts-file", type=Path, default=None, help=f"JSONL with a 'prompt' field ({DATASET})")
    parser.add_argument("--section-timeout", type=float, default=3600.0, help="seconds per section worker")
    parser.add_argument("--worker", choices=("vllm", "gateway", "hf", "nnsight"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    skip: set[str] = set()
    for item in filter(None, (s.strip().lower() for s in args.skip.split(","))):
        if item not in SECTIONS and item not in SECTION_ALIASES:
            parser.error(f"unknown section {item!r} in --skip; choose from {', '.join(SECTIONS)} or a-d")
        skip.update(SECTION_ALIASES.get(item, (item,)))
    args.skip = sorted(skip)
    if args.prompts < 1 or args.new_tokens < 1 or args.repeats < 1:
        parser.error("--prompts, --new-tokens and --repeats must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, through the `finally`s that stop workers, engines and the gateway."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.worker:
        run_worker(args.worker, args)
        return
    prompts, source = load_prompts(args.prompts, args.prompts_file)
    _log(f"prompts: {len(prompts)} from {source}; e.g. {prompts[0]!r}")
    plan = [s for s in ("vllm", "gateway", "hf", "nnsight") if s not in args.skip]
    if "gateway" in args.skip and "serving" not in args.skip:
        plan.insert(1, "gateway")  # the serving section runs in the gateway worker
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for section in plan:
        _log(f"section {section} ...")
        data = run_section(section, args, argv)
        if "_section_error" in data:
            _log(f"  {data['_section_error']}")
            results[f"{section}_error"] = {"label": f"({section}) section", "error": data["_section_error"]}
        else:
            results.update(data)
    ratios = report(results, args)
    if args.json:
        import torch

        payload = {
            "settings": {
                "prompts": args.prompts,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "skipped": args.skip,
                "prompt_source": source,
                "dtype": "bfloat16",
                "model": model_dir(),
                "malloc": "peers and gateway keep freed memory (keep_freed_memory); the SDK client does not",
            },
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "wall_seconds": time.perf_counter() - started,
            },
            "results": results,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        _log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
