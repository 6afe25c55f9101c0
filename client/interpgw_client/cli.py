"""`interpgw` command line: `serve` (needs the server package) and client commands for a quick look."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from interpgw_client.client import DEFAULT_ADDRESS, Client
from interpgw_client.errors import InterpgwError


def _positions(value: str) -> str | list[int]:
    if value in ("all", "last", "none"):
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"positions must be all, last, none or comma-separated integers, got {value!r}"
        ) from None


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port of the gateway (env INTERPGW_ADDRESS)")
    parser.add_argument("--model", default="", help="model id (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=None)


def cmd_models(args: argparse.Namespace) -> None:
    with Client(args.address, timeout=args.timeout) as client:
        for info in client.models():
            print(
                json.dumps(
                    {k: v for k, v in vars(info).items() if k != "hook_points"}
                    | {"n_hook_points": len(info.hook_points)}
                )
            )


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    with Client(args.address, timeout=args.timeout) as client:
        stream = client.generate_stream(
            prompt,
            model=args.model,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop or None,
        )
        for event in stream:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = stream.result
        print(f"\n[{len(result.token_ids)} tokens, finish: {result.finish_reason}]", file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> None:
    with Client(args.address, timeout=args.timeout) as client:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="interpgw", description="interpretability gateway for served LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="start the gateway (needs the server package: pip install interpgw)", add_help=False
    )
    serve.add_argument("rest", nargs=argparse.REMAINDER)

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

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "serve":
        try:
            from interpgw.serve import main as serve_main
        except ImportError as exc:
            parser.exit(2, f"interpgw serve needs the server package ({exc}); pip install interpgw[cpu]\n")
        serve_main(argv[1:])
        return
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InterpgwError as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
