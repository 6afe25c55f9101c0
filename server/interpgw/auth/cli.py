"""`interpgw keys`: the operator's tool to create, list and revoke API keys in a key file or in Redis.

A secret is printed once, when its key is created (alone on stdout's first line, so scripts can capture it); only
its hash is stored, and neither secrets nor hashes are ever listed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from interpgw.auth.keys import ApiKey, KeyLimits, check_tenant, new_api_key
from interpgw.auth.keystore import (
    DEFAULT_PREFIX,
    KeyStore,
    MemoryKeyStore,
    RedisKeyStore,
    read_key_file,
    write_key_file,
)
from interpgw.core.errors import GatewayError, InvalidArgument

PROG = "interpgw keys"
Save = Callable[[], Awaitable[None]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the gateway's API keys. Only sha256 hashes of secrets are stored; "
        "a secret is shown once, when its key is created.",
    )
    where = argparse.ArgumentParser(add_help=False)
    store = where.add_mutually_exclusive_group(required=True)
    store.add_argument("--file", help="YAML key file (the server's --api-keys-file); created by the first `create`")
    store.add_argument("--redis-url", help="Redis holding the keys (the server's --api-keys-redis)")
    where.add_argument("--redis-prefix", default=DEFAULT_PREFIX, help=f"Redis key prefix (default {DEFAULT_PREFIX})")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", parents=[where], help="create a key and print its secret once")
    create.add_argument("--tenant", required=True, help="1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    create.add_argument("--roles", required=True, help="comma-separated: read (generate, trace), steer, admin")
    create.add_argument("--name", default="", help="a label for people, e.g. where the key is used")
    create.add_argument("--rate", dest="requests_per_s", type=float, help="requests per second (server default)")
    create.add_argument("--burst", type=int, help="requests allowed at once above the rate (server default)")
    create.add_argument("--max-concurrent", type=int, help="requests in flight at once (server default)")
    create.add_argument("--capture-bytes-per-min", type=int, help="activation bytes per minute (server default)")
    create.add_argument("--max-tokens", type=int, help="tokens generated per request (server default)")

    listing = commands.add_parser("list", parents=[where], help="list keys (never their secrets or hashes)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")

    revoke = commands.add_parser("revoke", parents=[where], help="revoke a key by id (exit 1 if there is none)")
    revoke.add_argument("key_id", help="the key's id, e.g. key_3f2a9c1b7d4e")
    return parser


async def _create(args: argparse.Namespace, store: KeyStore, save: Save) -> int:
    limits = KeyLimits(
        requests_per_s=args.requests_per_s,
        burst=args.burst,
        max_concurrent=args.max_concurrent,
        capture_bytes_per_min=args.capture_bytes_per_min,
        max_tokens=args.max_tokens,
    )
    secret, key = new_api_key(args.tenant, args.roles, name=args.name, limits=limits)
    await store.add(key)
    await save()
    print(secret, flush=True)
    print(f"{key.id} tenant={key.tenant} roles={_roles(key)}", file=sys.stderr)
    print("the secret above is shown only now; the store keeps its hash", file=sys.stderr)
    return 0


async def _list(args: argparse.Namespace, store: KeyStore, save: Save) -> int:
    keys = await store.list(check_tenant(args.tenant) if args.tenant is not None else None)
    if args.json:
        for key in keys:
            print(json.dumps({k: v for k, v in key.to_json().items() if k != "sha256"}))
        return 0
    rows = [("ID", "TENANT", "ROLES", "NAME", "CREATED", "LIMITS")]
    for key in keys:
        created = datetime.fromtimestamp(key.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        limits = ",".join(f"{k}={v}" for k, v in key.limits.to_json().items()) or "-"
        rows.append((key.id, key.tenant, _roles(key), key.name or "-", created, limits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]))
    return 0


async def _revoke(args: argparse.Namespace, store: KeyStore, save: Save) -> int:
    if not await store.revoke(args.key_id):
        print(f"{PROG}: no API key {args.key_id!r} in {store.describe()}", file=sys.stderr)
        return 1
    await save()
    print(f"revoked {args.key_id}")
    return 0


def _roles(key: ApiKey) -> str:
    return ",".join(key.to_json()["roles"])


COMMANDS = {"create": _create, "list": _list, "revoke": _revoke}


class _KeyFile(MemoryKeyStore):
    """A key file loaded into memory, edited there, and written back (atomically) by `save`."""

    def __init__(self, path: str) -> None:
        super().__init__(read_key_file(path))
        self.path = path

    async def save(self) -> None:
        write_key_file(self.path, await self.list())

    def describe(self) -> str:
        return f"file {self.path}"


async def _saved_already() -> None:
    """Redis stores each change as it is made."""


async def _run(args: argparse.Namespace) -> int:
    store = _KeyFile(args.file) if args.file else RedisKeyStore(args.redis_url, prefix=args.redis_prefix)
    save = store.save if isinstance(store, _KeyFile) else _saved_already
    try:
        return await COMMANDS[args.command](args, store, save)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """Run `interpgw keys ...`; the exit code: 0 done, 1 failed (key not found, store unreachable), 2 bad input."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return asyncio.run(_run(args))
    except InvalidArgument as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (GatewayError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
