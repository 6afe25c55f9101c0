"""Where steering vectors live between requests.

Two interchangeable stores behind one async protocol:

- `MemoryVectorStore`: a dict in the gateway process, for a single replica and tests; vectors vanish on restart.
- `RedisVectorStore`: Redis, so that a gateway restart keeps registered vectors and every replica behind a load
  balancer sees the same registry. Each record is one opaque, self-checking value (see `records.py`), and a sorted set
  scored by creation time indexes them for newest-first listing.

Redis failures surface as `RegistryUnavailable` naming the server, never as raw redis-py exceptions, so the transport
can map them to one gRPC status.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from redis.exceptions import RedisError

from interpgw.redis_address import connect_redis, describe_redis
from interpgw.registry.errors import CorruptRecord, RegistryFull, RegistryUnavailable
from interpgw.registry.records import VectorRecord

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "interpgw:"
DEFAULT_MAX_RECORDS = 10_000
MGET_BATCH = 256

# Removes a dangling index entry only if its value is still absent, so a concurrent re-put of the same id survives.
_DROP_DANGLING = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
"""


@runtime_checkable
class VectorStore(Protocol):
    """Async registry of steering vectors, keyed by record id."""

    async def put(self, record: VectorRecord) -> None:
        """Insert or replace the record with `record.id`."""
        ...

    async def get(self, id: str) -> VectorRecord | None:
        """The record, or None if unknown."""
        ...

    async def delete(self, id: str) -> bool:
        """Remove the record; True if something was removed."""
        ...

    async def list(self, model: str | None = None) -> builtins.list[VectorRecord]:
        """All records (of `model` if given), newest first."""
        ...

    async def ping(self) -> None:
        """Raise RegistryUnavailable if the backing store cannot be reached."""
        ...

    async def count(self) -> int:
        """How many vectors are stored (cheap: for the registry-size metric)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...

    def describe(self) -> str:
        """Where records live, for logs: "memory" or "redis://host:port/db"."""
        ...


def _newest_first(records: builtins.list[VectorRecord]) -> builtins.list[VectorRecord]:
    # Ties broken by id descending: the same order as Redis ZREVRANGE (score, then member, descending).
    return sorted(records, key=lambda r: (r.created, r.id), reverse=True)


class MemoryVectorStore:
    """In-process store. No method awaits, so each runs atomically on the event loop without a lock."""

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.max_records = max_records
        self._records: dict[str, VectorRecord] = {}

    async def put(self, record: VectorRecord) -> None:
        if record.id not in self._records and len(self._records) >= self.max_records:
            raise RegistryFull(f"vector registry holds its maximum of {self.max_records} records")
        # Own copy of the tensor: a caller editing its tensor in place must not change the stored vector.
        self._records[record.id] = dataclasses.replace(record, tensor=record.tensor.clone())

    async def get(self, id: str) -> VectorRecord | None:
        return self._records.get(id)

    async def delete(self, id: str) -> bool:
        return self._records.pop(id, None) is not None

    async def list(self, model: str | None = None) -> builtins.list[VectorRecord]:
        return _newest_first([r for r in self._records.values() if model is None or r.model == model])

    async def ping(self) -> None:
        return None

    async def count(self) -> int:
        return len(self._records)

    async def close(self) -> None:
        self._records.clear()

    def describe(self) -> str:
        return "memory"

    def __len__(self) -> int:
        return len(self._records)


class RedisVectorStore:
    """Redis-backed store: `{prefix}vec:{id}` -> record bytes, `{prefix}vecs` zset of ids scored by `created`."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        try:
            self._client = connect_redis(url)
        except ValueError as exc:
            raise ValueError(f"invalid Redis URL for the vector registry: {exc}") from None
        self._where = describe_redis(self._client)
        self._reported_corrupt: set[str] = set()  # ids already logged as corrupt by list()

    def _key(self, id: str) -> str:
        return f"{self.prefix}vec:{id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}vecs"

    @contextlib.asynccontextmanager
    async def _guard(self, op: str) -> AsyncIterator[None]:
        """Turn any redis-py or socket failure into RegistryUnavailable naming the server."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise RegistryUnavailable(
                f"vector registry at {self._where} unavailable ({op}): {type(exc).__name__}: {exc}"
            ) from exc

    async def put(self, record: VectorRecord) -> None:
        data = record.to_bytes()
        async with self._guard("put"), self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record.id), data)
            pipe.zadd(self._index, {record.id: record.created})
            await pipe.execute()

    async def get(self, id: str) -> VectorRecord | None:
        async with self._guard("get"):
            data = await self._client.get(self._key(id))
        if data is None:
            return None
        return self._decode(id, data)

    async def delete(self, id: str) -> bool:
        async with self._guard("delete"), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(id))
            pipe.zrem(self._index, id)
            n_values, n_index = await pipe.execute()
        return bool(n_values or n_index)

    async def list(self, model: str | None = None) -> builtins.list[VectorRecord]:
        async with self._guard("list"):
            ids = [raw.decode() for raw in await self._client.zrevrange(self._index, 0, -1)]  # newest first
        records: builtins.list[VectorRecord] = []
        dangling: builtins.list[str] = []
        for start in range(0, len(ids), MGET_BATCH):
            batch = ids[start : start + MGET_BATCH]
            async with self._guard("list"):
                values = await self._client.mget([self._key(id) for id in batch])
            for id, data in zip(batch, values, strict=True):
                if data is None:
                    dangling.append(id)
                    continue
                try:
                    record = self._decode(id, data)
                except CorruptRecord as exc:
                    if id not in self._reported_corrupt:
                        self._reported_corrupt.add(id)
                        log.warning("skipping corrupt vector record in %s: %s", self._where, exc)
                    continue
                if model is None or record.model == model:
                    records.append(record)
        if dangling:
            async with self._guard("list"):
                for id in dangling:
                    await self._client.eval(_DROP_DANGLING, 2, self._key(id), self._index, id)
        return records

    def _decode(self, id: str, data: bytes) -> VectorRecord:
        try:
            record = VectorRecord.from_bytes(data)
        except CorruptRecord as exc:
            raise CorruptRecord(f"vector {id} in {self._where}: {exc}") from exc
        if record.id != id:
            raise CorruptRecord(f"vector {id} in {self._where}: value holds record {record.id!r}")
        return record

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._client.ping()

    async def count(self) -> int:
        async with self._guard("count"):
            return int(await self._client.zcard(self._index))

    async def close(self) -> None:
        await self._client.aclose()

    def describe(self) -> str:
        return self._where


def open_vector_store(redis_url: str | None, prefix: str = DEFAULT_PREFIX) -> VectorStore:
    """Redis store when a URL is configured, otherwise an in-memory one."""
    if not redis_url:
        return MemoryVectorStore()
    return RedisVectorStore(redis_url, prefix=prefix)
