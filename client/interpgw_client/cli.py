"""`interpgw` command line: `serve` and `keys` (need the server package) and client commands for a quick look."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from interpgw_client.client import DEFAULT_ADDRESS, Client
from interpgw_client.errors import InterpgwError
from interpgw_client.protocol import GenerateResult, SteeringVector
from interpgw_client.signals import Probe, Signals


def _positions(value: str) -> str | list[int]:
    if value in ("all", "last", "none"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"positions must be all, last, none or comma-separated integers, got {value!r}"
        ) from None


def _layers(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers are comma-separated integers, got {value!r}") from None


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port of the gateway (env INTERPGW_ADDRESS)")
    parser.add_argument("--model", default="", help="model id (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--api-key", default=None, help="API key (env INTERPGW_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA bundle")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def _connect(args: argparse.Namespace) -> Client:
    credentials = None
    if args.tls or args.tls_ca or args.tls_cert:

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    return Client(args.address, credentials=credentials, api_key=args.api_key, timeout=args.timeout)


def cmd_health(args: argparse.Namespace) -> None:
    """Exit 0 when the gateway's gRPC health service says SERVING (container health checks use this)."""
    with _connect(args) as client:
        try:
            client.wait_ready(timeout=args.timeout or 5.0)
        except TimeoutError as exc:
            raise SystemExit(f"not serving: {exc}") from None
    print("SERVING")


def cmd_models(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        for info in client.models():
            print(
                json.dumps(
                    {k: v for k, v in vars(info).items() if k != "hook_points"}
                    | {"n_hook_points": len(info.hook_points)}
                )
            )


def cmd_generate(args: argparse.Namespace) -> None:
    if args.compare and not args.steer:
        raise ValueError("--compare needs --steer (unsteered, both continuations are the same)")
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    wants_signals = args.signals or bool(args.lens) or bool(args.probe)
    signals = Signals(lens_layers=args.lens, probes=args.probe) if wants_signals else None
    with _connect(args) as client:
        stream = client.generate_stream(
            prompt,
            model=args.model,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop or None,
            steer={"vector": args.steer, "scale": args.scale} if args.steer else None,
            compare_unsteered=args.compare,
            signals=signals,
        )
        if args.compare:
            print(f"=== steered ({args.steer} x {args.scale:g}) ===")
        for event in stream:  # the baseline's events (variant 1) are printed whole at the end
            if event.variant == 0:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        result = stream.result
        if args.compare and result.baseline is not None:
            print(f"\n=== unsteered ===\n{result.baseline.text}", end="")
        if wants_signals:
            print()
            _print_signals(result)
        seed = "" if result.seed is None else f", seed: {result.seed}"
        print(f"\n[{len(result.token_ids)} tokens, finish: {result.finish_reason}{seed}]", file=sys.stderr)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _print_signals(result: GenerateResult) -> None:
    """One line per generated token: index, text, entropy, logprob, rank, then lens and probe values."""
    by_index = {s.index: s for s in result.signals}
    for i, text in enumerate(result.tokens):
        item = by_index.get(i)
        values = item.values() if item else {}
        line = (
            f"{i:>4} {text!r:<14} entropy {_fmt(values.get('entropy'))} logprob {_fmt(values.get('logprob'))} "
            f"rank {_fmt(item.rank if item else None, 'd')}"
        )
        extra = [f"{name} {value:.3f}" for name, value in values.items() if name.startswith(("lens_kl:", "probe:"))]
        if item is not None and item.lens_earliest is not None:
            extra.append(f"lens_earliest {item.lens_earliest}")
        print("  ".join([line, *extra]))
    if result.scores:
        print("scores: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.scores.items())))
    for event in result.monitor_events:
        print(
            f"monitor {event.monitor}: {event.action} at token {event.token_index} ({event.signal} {event.value:.4g})"
        )


def cmd_trace(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        result = client.trace(args.prompt, args.hook, positions=args.positions, model=args.model, top_k=args.top_k)
        for trace in result.prompts:
            print(f"prompt {trace.prompt_index}: {len(trace.token_ids)} tokens {trace.tokens}")
            for hook, array in trace.activations.items():
                norms = np.linalg.norm(array, axis=-1) if array.size else np.array([])
                print(
                    f"  {hook}: shape {list(array.shape)} positions {trace.positions} "
                    f"norms {np.round(norms, 2).tolist()}"
                )
                if args.save:
                    np.save(f"{args.save}_{trace.prompt_index}_{hook}.npy", array)
            if trace.top_logits:
                pairs = zip(trace.top_logits.tokens, trace.top_logits.logprobs, strict=True)
                print("  next token:", ", ".join(f"{t!r} {lp:.3f}" for t, lp in pairs))


def _vector_json(vector: SteeringVector) -> str:
    fields = {k: v for k, v in vars(vector).items() if k not in ("vector", "created", "separation")}
    created = vector.created.isoformat() if vector.created else None
    return json.dumps(fields | {"created": created, "separation": [round(s, 4) for s in vector.separation]})


def _json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-empty line of a JSON-lines file."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _read_pairs(path: str) -> list[dict]:
    """JSON lines {"positive": ..., "negative": ...} (a prompt each: text, chat messages or token ids)."""
    pairs = []
    for number, item in _json_lines(path):
        if not isinstance(item, dict) or not {"positive", "negative"} <= set(item):
            raise ValueError(f'{path}:{number}: expected {{"positive": ..., "negative": ...}}')
        pairs.append({"positive": item["positive"], "negative": item["negative"]})
    return pairs


def cmd_steer_train(args: argparse.Namespace) -> None:
    pairs = _read_pairs(args.pairs)
    with _connect(args) as client:
        vector = client.steering.train(
            pairs,
            layers=args.layers,
            method=args.method,
            reduce=args.reduce,
            name=args.name,
            description=args.description,
            model=args.model,
        )
    print(vector.id)
    print(_vector_json(vector))


def cmd_steer_list(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        vectors = client.steering.list(args.model)
    if not vectors:
        print("no vectors", file=sys.stderr)
        return
    header = ("ID", "MODEL", "NAME", "METHOD", "PAIRS", "CREATED", "HOOKS")
    rows = [
        (
            v.id,
            v.model,
            v.name,
            v.method,
            str(v.n_pairs),
            v.created.strftime("%Y-%m-%d %H:%M") if v.created else "",
            ",".join(v.hooks) if len(v.hooks) <= 2 else f"{v.hooks[0]} (+{len(v.hooks) - 1})",
        )
        for v in vectors
    ]
    _print_table(header, rows)


def cmd_steer_get(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        vector = client.steering.get(args.id)
    print(_vector_json(vector))
    if vector.vector is not None:
        for hook, norm in zip(vector.hooks, np.linalg.norm(vector.vector, axis=-1).tolist(), strict=True):
            print(f"  {hook}: norm {norm:.4g}")
        if args.save:
            np.save(args.save, vector.vector)


def cmd_steer_delete(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        deleted = client.steering.delete(args.id)
    if not deleted:
        raise ValueError(f"no vector {args.id!r}")
    print(f"deleted {args.id}")


def _utc(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, timezone.utc) if seconds else None  # noqa: UP017 (3.10)


def _probe_json(probe: Probe) -> str:
    fields = {k: v for k, v in vars(probe).items() if k not in ("weight", "quantiles", "created")}
    created = _utc(probe.created)
    return json.dumps(fields | {"created": created.isoformat() if created else None})


def _read_examples(path: str) -> list[dict]:
    """JSON lines {"statement" | "text" | "prompt": ..., "label": true/false or 1/0}; other keys are ignored."""
    examples = []
    for number, item in _json_lines(path):
        keys = [k for k in ("statement", "text", "prompt") if isinstance(item, dict) and k in item]
        if len(keys) != 1 or "label" not in item:
            raise ValueError(f'{path}:{number}: expected {{"statement" | "text" | "prompt": ..., "label": ...}}')
        examples.append({"prompt": item[keys[0]], "label": item["label"]})
    return examples


def cmd_probe_train(args: argparse.Namespace) -> None:
    examples = _read_examples(args.file)
    with _connect(args) as client:
        probe = client.probes.train(
            examples,
            layer=args.layer,
            position=args.position,
            name=args.name,
            description=args.description,
            model=args.model,
        )
    print(probe.id)
    print(_probe_json(probe))


def cmd_probe_list(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        probes = client.probes.list(args.model)
    if not probes:
        print("no probes", file=sys.stderr)
        return
    header = ("ID", "MODEL", "NAME", "HOOK", "POSITION", "TEST_AUROC", "N", "CREATED")
    rows = [
        (
            p.id,
            p.model,
            p.name,
            p.hook,
            p.position,
            f"{p.test_auroc:.3f}",
            str(p.n_train + p.n_test),
            created.strftime("%Y-%m-%d %H:%M") if (created := _utc(p.created)) else "",
        )
        for p in probes
    ]
    _print_table(header, rows)


def cmd_probe_get(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        probe = client.probes.get(args.id)
    print(_probe_json(probe))
    if probe.weight is not None:
        print(f"  {probe.hook}: weight norm {float(np.linalg.norm(probe.weight)):.4g}, bias {probe.bias:.4g}")
        if args.save:
            np.save(args.save, probe.weight)


def cmd_probe_delete(args: argparse.Namespace) -> None:
    with _connect(args) as client:
        deleted = client.probes.delete(args.id)
    if not deleted:
        raise ValueError(f"no probe {args.id!r}")
    print(f"deleted {args.id}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="interpgw", description="interpretability gateway for served LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="start the gateway (needs the server package: pip install interpgw)", add_help=False
    )
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    keys = sub.add_parser(
        "keys", help="manage API keys in a key file or Redis (operators; needs the server package)", add_help=False
    )
    keys.add_argument("rest", nargs=argparse.REMAINDER)

    health = sub.add_parser("health", help="exit 0 if the gateway is serving (for container health checks)")
    _client_args(health)
    health.set_defaults(func=cmd_health)

    models = sub.add_parser("models", help="list served models")
    _client_args(models)
    models.set_defaults(func=cmd_models)

    gen = sub.add_parser("generate", help="stream a generation")
    _client_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--steer", default=None, metavar="VECTOR_ID", help="add a registry steering vector")
    gen.add_argument("--scale", type=float, default=1.0, help="the steering vector's scale")
    gen.add_argument("--compare", action="store_true", help="also print the unsteered continuation (same seed)")
    gen.add_argument("--signals", action="store_true", help="print per-token signals (entropy, logprob, rank, ...)")
    gen.add_argument("--lens", type=int, action="append", default=[], metavar="LAYER", help="logit lens (repeatable)")
    gen.add_argument("--probe", action="append", default=[], metavar="ID", help="apply a registry probe (repeatable)")
    gen.set_defaults(func=cmd_generate)

    trace = sub.add_parser("trace", help="capture activations for a prompt")
    _client_args(trace)
    trace.add_argument("prompt", nargs="+")
    trace.add_argument("--hook", action="append", default=[], help="hook point (repeatable)")
    trace.add_argument(
        "--positions", type=_positions, default="all", help="all | last | none | comma-separated indices"
    )
    trace.add_argument("--top-k", type=int, default=5, help="top-k next-token predictions")
    trace.add_argument("--save", default=None, help="save arrays as PREFIX_<prompt>_<hook>.npy")
    trace.set_defaults(func=cmd_trace)

    steer = sub.add_parser("steer", help="the steering-vector registry").add_subparsers(dest="action", required=True)
    train = steer.add_parser("train", help="train a vector from contrastive prompt pairs")
    _client_args(train)
    train.add_argument("--pairs", required=True, metavar="FILE.jsonl", help='lines {"positive": ..., "negative": ...}')
    train.add_argument("--layers", type=_layers, default=None, help="comma-separated layers (default: every layer)")
    train.add_argument("--method", choices=("mean_diff", "pca"), default="mean_diff")
    train.add_argument("--reduce", choices=("last", "mean"), default="last", help="last token or mean over tokens")
    train.add_argument("--name", default="")
    train.add_argument("--description", default="")
    train.set_defaults(func=cmd_steer_train)
    listing = steer.add_parser("list", help="list stored vectors")
    _client_args(listing)
    listing.set_defaults(func=cmd_steer_list)
    get = steer.add_parser("get", help="show one vector")
    _client_args(get)
    get.add_argument("id")
    get.add_argument("--save", default=None, metavar="FILE.npy", help="save the [n_hooks, d_model] array")
    get.set_defaults(func=cmd_steer_get)
    delete = steer.add_parser("delete", help="delete one vector")
    _client_args(delete)
    delete.add_argument("id")
    delete.set_defaults(func=cmd_steer_delete)

    probe = sub.add_parser("probe", help="the linear-probe registry").add_subparsers(dest="action", required=True)
    train = probe.add_parser("train", help="train a probe from labelled prompts")
    _client_args(train)
    train.add_argument(
        "--file", required=True, metavar="FILE.jsonl", help='lines {"statement"|"text"|"prompt": ..., "label": ...}'
    )
    train.add_argument("--layer", type=int, default=None, help="resid_post layer (default: the middle layer)")
    train.add_argument("--position", choices=("last", "mean"), default="last", help="last token or mean over tokens")
    train.add_argument("--name", default="")
    train.add_argument("--description", default="")
    train.set_defaults(func=cmd_probe_train)
    listing = probe.add_parser("list", help="list stored probes")
    _client_args(listing)
    listing.set_defaults(func=cmd_probe_list)
    get = probe.add_parser("get", help="show one probe")
    _client_args(get)
    get.add_argument("id")
    get.add_argument("--save", default=None, metavar="FILE.npy", help="save the [d_model] weight")
    get.set_defaults(func=cmd_probe_get)
    delete = probe.add_parser("delete", help="delete one probe")
    _client_args(delete)
    delete.add_argument("id")
    delete.set_defaults(func=cmd_probe_delete)

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "serve":
        try:
            from interpgw.serve import main as serve_main
        except ImportError as exc:
            parser.exit(2, f"interpgw serve needs the server package ({exc}); pip install interpgw[cpu]\n")
        serve_main(argv[1:])
        return
    if argv and argv[0] == "keys":
        try:
            from interpgw.auth.cli import main as keys_main
        except ImportError as exc:
            parser.exit(2, f"interpgw keys needs the server package ({exc}); pip install interpgw\n")
        raise SystemExit(keys_main(argv[1:]))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (InterpgwError, OSError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
