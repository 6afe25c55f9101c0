"""Where API key records live, behind one async protocol the authenticator reads.

- `MemoryKeyStore`: keys given programmatically, and tests.
- `FileKeyStore`: a YAML file an operator manages (e.g. a mounted Kubernetes Secret), re-read when it changes, so
  keys rotate without a restart. Read-only for the server; `interpgw keys --file PATH` edits it.
- `RedisKeyStore`: Redis, shared by every replica and writable, so admins can manage keys over the API.

The key file (JSON works too, since YAML reads it):

```yaml
# interpgw API keys: only sha256 hashes of secrets are stored here. Manage with `interpgw keys`.
keys:
  - id: key_3f2a9c1b7d4e
    tenant: acme
    roles: [read, steer]
    sha256: 9f86d0...
    name: notebook
    created: 1764000000.0
    limits: {requests_per_s: 5, burst: 10, max_concurrent: 4, capture_bytes_per_min: 1073741824, max_tokens: 512}
```

`id`, `tenant`, `roles` and `sha256` are required; `name`, `created` and `limits` (any subset) are optional.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import yaml
from redis.exceptions import RedisError

from interpgw.auth.keys import ApiKey
from interpgw.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from interpgw.redis_address import connect_redis, describe_redis

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "interpgw:"
MGET_BATCH = 256
FILE_HEADER = "# interpgw API keys: only sha256 hashes of secrets are stored here. Manage with `interpgw keys`.\n"

# Adds a record unless its id or its hash is taken: 1 added, 0 id taken, -1 hash taken.
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


@runtime_checkable
class KeyStore(Protocol):
    """Async store of API key records, looked up by the sha256 of the secret."""

    writable: bool

    async def lookup(self, sha256: str) -> ApiKey | None:
        """The record whose secret hashes to `sha256`, or None."""
        ...

    async def add(self, key: ApiKey) -> None:
        """Store a new key; FailedPrecondition when not writable, InvalidArgument on a duplicate id."""
        ...

    async def revoke(self, key_id: str) -> bool:
        """Remove the key; True if it existed."""
        ...

    async def list(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        """The keys (of `tenant` if given), newest first."""
        ...

    async def ping(self) -> None:
        """Raise Unavailable if the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...

    def describe(self) -> str:
        """Where keys live, for the start-up log line; never secrets or passwords."""
        ...


def _newest_first(keys: Iterable[ApiKey], tenant: str | None) -> builtins.list[ApiKey]:
    return sorted(
        (k for k in keys if tenant is None or k.tenant == tenant), key=lambda k: (k.created, k.id), reverse=True
    )


def _index(keys: Iterable[ApiKey], where: str) -> dict[str, ApiKey]:
    """Keys by hash; a repeated id or hash is an error, since it would make revoking or looking up ambiguous."""
    by_hash: dict[str, ApiKey] = {}
    ids: set[str] = set()
    for key in keys:
        if key.id in ids:
            raise InvalidArgument(f"{where}: duplicate key id {key.id}")
        if key.sha256 in by_hash:
            raise InvalidArgument(f"{where}: keys {by_hash[key.sha256].id} and {key.id} have the same secret hash")
        ids.add(key.id)
        by_hash[key.sha256] = key
    return by_hash


class MemoryKeyStore:
    """In-process keys. No method awaits, so each runs atomically on the event loop."""

    writable = True

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_hash = _index(keys, "memory key store")

    async def lookup(self, sha256: str) -> ApiKey | None:
        return self._by_hash.get(sha256)

    async def add(self, key: ApiKey) -> None:
        self._by_hash = _index([*self._by_hash.values(), key], "memory key store")

    async def revoke(self, key_id: str) -> bool:
        for sha256, key in self._by_hash.items():
            if key.id == key_id:
                del self._by_hash[sha256]
                return True
        return False

    async def list(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        return _newest_first(self._by_hash.values(), tenant)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._by_hash.clear()

    def describe(self) -> str:
        return "memory"


def _parse_key_file(path: Path) -> builtins.list[ApiKey]:
    """The keys in a key file; InvalidArgument naming the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read API key file {path}: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"API key file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise InvalidArgument(f"API key file {path} must be a mapping with a 'keys' list (see `interpgw keys`)")
    keys = []
    for i, entry in enumerate(doc["keys"]):
        try:
            keys.append(ApiKey.from_json(entry))
        except InvalidArgument as exc:
            raise InvalidArgument(f"API key file {path}, entry {i}: {exc}") from None
    _index(keys, f"API key file {path}")
    return keys


def read_key_file(path: str | Path) -> builtins.list[ApiKey]:
    """The keys in a key file, in file order; a missing file has none (the CLI is creating the first key)."""
    path = Path(path)
    if not path.exists():
        return []
    return _parse_key_file(path)


def write_key_file(path: str | Path, keys: Iterable[ApiKey]) -> None:
    """Replace the key file atomically (temp file in the same folder, then rename), readable by its owner only."""
    path = Path(path)
    body = yaml.safe_dump({"keys": [k.to_json() for k in keys]}, sort_keys=False, default_flow_style=None, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)  # the first key may be created before its folder exists
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(FILE_HEADER + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class FileKeyStore:
    """Keys from a YAML (or JSON, which YAML reads) file an operator manages, e.g. a mounted Kubernetes Secret.

    Re-read when the file's mtime/size changes (checked at most once per second), so keys rotate without a restart.
    Read-only for the server (`writable = False`): the CLI edits the file. A file that becomes invalid or disappears
    later keeps the last good keys and logs a warning once per change.
    """

    writable = False

    def __init__(
        self, path: str | Path, *, check_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._stamp = self._stat()  # before reading: a change during the read is seen at the next check
        self._by_hash = _index(_parse_key_file(self.path), f"API key file {self.path}")
        self._checked_at = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        # The inode too: a Kubernetes Secret update swaps a symlink to a new file, whose mtime may not be newer.
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked_at < self._check_interval_s:
            return
        self._checked_at = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = _parse_key_file(self.path)
        except InvalidArgument as exc:
            log.warning("keeping the %d API keys read before: %s", len(self._by_hash), exc)
            return
        self._by_hash = _index(keys, f"API key file {self.path}")
        log.info("reloaded %d API keys from %s", len(self._by_hash), self.path)

    async def lookup(self, sha256: str) -> ApiKey | None:
        self._maybe_reload()
        return self._by_hash.get(sha256)

    def _read_only(self) -> FailedPrecondition:
        return FailedPrecondition(
            f"API keys come from the file {self.path}, read-only for the server: "
            f"manage them with `interpgw keys ... --file {self.path}`"
        )

    async def add(self, key: ApiKey) -> None:
        raise self._read_only()

    async def revoke(self, key_id: str) -> bool:
        raise self._read_only()

    async def list(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        self._maybe_reload()
        return _newest_first(self._by_hash.values(), tenant)

    async def ping(self) -> None:
        self._maybe_reload()  # a broken file keeps the last good keys, so the store stays usable

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return f"file {self.path}"


class RedisKeyStore:
    """Keys in Redis (shared by replicas; writable, so admins can manage keys over the API).

    Layout: `{prefix}apikey:{sha256}` -> JSON of the record; `{prefix}apikey-id:{id}` -> sha256.
    """

    writable = True

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        try:
            self._client = connect_redis(url)
        except ValueError as exc:
            raise InvalidArgument(f"invalid Redis URL for the API key store: {exc}") from None
        self._where = describe_redis(self._client)
        self._reported_corrupt: set[str] = set()  # hashes already logged as corrupt

    def _record_key(self, sha256: str) -> str:
        return f"{self.prefix}apikey:{sha256}"

    def _id_key(self, key_id: str) -> str:
        return f"{self.prefix}apikey-id:{key_id}"

    @contextlib.asynccontextmanager
    async def _guard(self, op: str) -> AsyncIterator[None]:
        """Turn any redis-py or socket failure into Unavailable naming the server."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise Unavailable(f"key store unreachable: {self._where} ({op}): {type(exc).__name__}: {exc}") from exc

    def _decode(self, sha256: str, data: bytes) -> ApiKey | None:
        """The record, or None (logged once) if the value is not a valid record for this hash."""
        try:
            key = ApiKey.from_json(json.loads(data))
            if key.sha256 != sha256:
                raise InvalidArgument(f"value holds the record of another hash (key {key.id})")
        except (ValueError, InvalidArgument) as exc:
            if sha256 not in self._reported_corrupt:
                self._reported_corrupt.add(sha256)
                log.warning("ignoring corrupt API key record %s in %s: %s", self._record_key(sha256), self._where, exc)
            return None
        return key

    async def lookup(self, sha256: str) -> ApiKey | None:
        async with self._guard("lookup"):
            data = await self._client.get(self._record_key(sha256))
        return None if data is None else self._decode(sha256, data)

    async def add(self, key: ApiKey) -> None:
        async with self._guard("add"):
            added = await self._client.eval(
                _ADD, 2, self._id_key(key.id), self._record_key(key.sha256), json.dumps(key.to_json()), key.sha256
            )
        if added == 0:
            raise InvalidArgument(f"an API key with id {key.id} already exists")
        if added == -1:
            raise InvalidArgument(f"an API key with the same secret hash as {key.id} already exists")

    async def revoke(self, key_id: str) -> bool:
        async with self._guard("revoke"):
            sha256 = await self._client.get(self._id_key(key_id))
            if sha256 is None:
                return False
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._id_key(key_id))
                pipe.delete(self._record_key(sha256.decode()))
                n_ids, _ = await pipe.execute()
        return bool(n_ids)

    async def list(self, tenant: str | None = None) -> builtins.list[ApiKey]:
        record_prefix = self._record_key("")
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", record_prefix) + "*"  # the prefix matched literally
        async with self._guard("list"):
            names = [name async for name in self._client.scan_iter(match=pattern, count=1000)]
        keys = []
        for start in range(0, len(names), MGET_BATCH):
            batch = names[start : start + MGET_BATCH]
            async with self._guard("list"):
                values = await self._client.mget(batch)
            for name, data in zip(batch, values, strict=True):
                key = None if data is None else self._decode(name.decode()[len(record_prefix) :], data)
                if key is not None:
                    keys.append(key)
        return _newest_first(keys, tenant)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    def describe(self) -> str:
        return f"{self._where} (prefix {self.prefix!r})"


def open_key_store(file: str | None, redis_url: str | None, prefix: str = DEFAULT_PREFIX) -> KeyStore | None:
    """The configured key store, or None when neither option is given (authentication off)."""
    if file and redis_url:
        raise InvalidArgument("choose one of --api-keys-file and --api-keys-redis")
    if file:
        return FileKeyStore(file)
    if redis_url:
        return RedisKeyStore(redis_url, prefix=prefix)
    return None
