"""Where activation traces are cached between requests.

Two interchangeable backends behind one async protocol:

- `MemoryTraceCache`: an LRU in the gateway process, bounded by the serialized size of its entries; for a single
  replica and tests. It keeps the serialized bytes, not the tensors, so sizes are exact and every hit is a fresh copy
  that a caller may edit in place without changing the cache.
- `RedisTraceCache`: Redis, shared by every replica behind a load balancer and surviving gateway restarts.

`TieredTraceCache` puts a bounded `MemoryTraceCache` in front of Redis (a near cache, as LMCache keeps a local CPU
tier in front of its remote one): a trace that this replica has written or read recently is served from its own
memory, without moving tens of MiB out of Redis again. Entries are content-addressed (the key names everything that
decides the trace), so the near copy never needs invalidating.

A cache is an optimisation, never a dependency: unlike the vector registry, the Redis backend does not raise when
Redis is down, slow or full. A failing call is counted, logged (rate-limited) and answered as a miss / not stored, and
a small circuit breaker stops trying Redis for a while after a connection failure so that requests do not each pay a
timeout during an outage. Caching resumes by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.retry import Retry as SyncRetry

from interpgw.cache.entries import CachedTrace, CorruptEntry
from interpgw.redis_address import describe_redis

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_PREFIX = "interpgw:"
DEFAULT_MAX_BYTES = 1 * GiB
DEFAULT_MAX_ENTRY_BYTES = 256 * MiB
DEFAULT_REDIS_TTL_S = 86400.0
# Deadline of one Redis command: SOCKET_TIMEOUT_S, plus the time to move its value at TRANSFER_BYTES_PER_S. A fixed
# 1 s would make a hung Redis cost 1 s per call but fail every large entry (256 MiB takes about 1 s over localhost
# on a loaded machine), trip the breaker, and so never cache big traces. 64 MiB/s leaves ample margin on a LAN.
SOCKET_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 0.5
TRANSFER_BYTES_PER_S = 64 * MiB
DEFAULT_RETRY_INTERVAL_S = 2.0
DEFAULT_LOG_INTERVAL_S = 30.0
# Entries at least this big are (de)serialized in a worker thread: hashing and copying hundreds of MiB on the event
# loop would stall every other request of the gateway for a noticeable fraction of a second.
OFFLOAD_BYTES = 1 * MiB
READ_PIECE_BYTES = 1 * MiB  # values larger than this are read in pieces of this size (RedisTraceCache._get_in_pieces)

EventKind = Literal["hit", "miss", "error", "eviction", "corrupt", "write", "skip"]
# event kind -> (counter it increments, byte counter its nbytes is added to)
_COUNTERS: dict[str, tuple[str, str | None]] = {
    "hit": ("hits", "bytes_read"),
    "miss": ("misses", None),
    "error": ("errors", None),
    "eviction": ("evictions", None),
    "corrupt": ("corrupt", None),
    "write": ("writes", "bytes_written"),
    "skip": ("skipped_too_large", None),
}


@dataclass
class CacheStats:
    """Counters of one cache, plus an optional listener for each event (the metrics module hooks in there).

    hits/misses count lookups that reached the store; a corrupt value counts as "corrupt" and as a miss. errors count
    operations that did not reach the store because of a backend problem, including those the Redis backend's circuit
    breaker skipped while Redis was unreachable. skipped_too_large counts puts refused for size.
    """

    hits: int = 0
    misses: int = 0
    errors: int = 0
    evictions: int = 0
    corrupt: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    skipped_too_large: int = 0
    on_event: Callable[[str, int], None] | None = field(default=None, repr=False, compare=False)
    _listener_failed: bool = field(default=False, init=False, repr=False, compare=False)

    def record(self, kind: EventKind, nbytes: int = 0) -> None:
        """Count one event of `kind` (`nbytes`: the entry's serialized size where one is involved) and notify."""
        counter, byte_counter = _COUNTERS[kind]
        setattr(self, counter, getattr(self, counter) + 1)
        if byte_counter is not None:
            setattr(self, byte_counter, getattr(self, byte_counter) + nbytes)
        if self.on_event is None:
            return
        try:
            self.on_event(kind, nbytes)
        except Exception:
            # Metrics must never break a request; a broken listener is logged once, not once per event.
            if not self._listener_failed:
                self._listener_failed = True
                log.warning("trace cache event listener failed (further failures not logged)", exc_info=True)

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: getattr(self, name) for name in _COUNTER_NAMES}


_COUNTER_NAMES = (
    "hits",
    "misses",
    "errors",
    "evictions",
    "corrupt",
    "writes",
    "bytes_read",
    "bytes_written",
    "skipped_too_large",
)


@runtime_checkable
class TraceCache(Protocol):
    """Async cache of activation traces, keyed by `cache_key` content addresses."""

    stats: CacheStats
    max_entry_bytes: int  # larger entries are not stored

    async def get(self, key: str) -> CachedTrace | None:
        """The entry, or None on a miss (absent, expired, corrupt, or the backend unavailable)."""
        ...

    async def put(self, key: str, entry: CachedTrace) -> bool:
        """Store the entry; True if stored, False if skipped (too large) or the backend failed."""
        ...

    async def put_encoded(self, key: str, data: bytes) -> bool:
        """`put` of an entry already serialized with `CachedTrace.to_bytes` (`data` is not checked)."""
        ...

    async def get_with_value(self, key: str) -> tuple[CachedTrace, list[bytes]] | None:
        """`get`, and the checked bytes the entry was read from (their concatenation), for a copy elsewhere."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the entry if present."""
        ...

    async def close(self) -> None:
        """Release memory and connections; the cache is unusable afterwards."""
        ...

    def describe(self) -> str:
        """Where entries live, for logs: "memory" or "redis://host:port/db"."""
        ...


async def _encode(entry: CachedTrace) -> bytes:
    if entry.nbytes >= OFFLOAD_BYTES:
        return await asyncio.to_thread(entry.to_bytes)
    return entry.to_bytes()


async def _decode(pieces: list[bytes]) -> CachedTrace:
    """The entry whose bytes are the concatenation of `pieces` (`CachedTrace.from_pieces`)."""
    if sum(map(len, pieces)) >= OFFLOAD_BYTES:
        return await asyncio.to_thread(CachedTrace.from_pieces, pieces)
    return CachedTrace.from_pieces(pieces)


def _check_limits(max_entry_bytes: int, ttl_s: float | None) -> None:
    if max_entry_bytes <= 0:
        raise ValueError(f"max_entry_bytes must be positive, got {max_entry_bytes}")
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")


class MemoryTraceCache:
    """In-process LRU bounded by serialized bytes. Dict updates never straddle an await, so no lock is needed."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        ttl_s: float | None = None,
    ) -> None:
        _check_limits(max_entry_bytes, ttl_s)
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.ttl_s = ttl_s
        self.stats = CacheStats()
        # key -> (serialized entry, monotonic expiry or None); least recently used first
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Serialized bytes currently held (what `max_bytes` bounds)."""
        return self._bytes

    @property
    def entry_limit(self) -> int:
        """The largest entry stored: `max_entry_bytes`, or the whole budget if that is smaller."""
        return min(self.max_entry_bytes, self.max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is held and not expired, without counting a lookup or refreshing its recency."""
        item = self._entries.get(key) if isinstance(key, str) else None
        return item is not None and not self._expired(item)

    @staticmethod
    def _expired(item: tuple[bytes, float | None]) -> bool:
        return item[1] is not None and time.monotonic() >= item[1]

    def _drop(self, key: str) -> int:
        data, _ = self._entries.pop(key)
        self._bytes -= len(data)
        return len(data)

    async def get(self, key: str) -> CachedTrace | None:
        found = await self.get_with_value(key)
        return None if found is None else found[0]

    async def get_with_value(self, key: str) -> tuple[CachedTrace, list[bytes]] | None:
        item = self._entries.get(key)
        if item is None or self._expired(item):
            if item is not None:
                self._drop(key)
            self.stats.record("miss")
            return None
        self._entries.move_to_end(key)
        data = item[0]
        try:
            entry = await _decode([data])
        except CorruptEntry as exc:  # only a bug or memory corruption gets here; never serve it
            log.error("dropping corrupt in-memory trace %s: %s", key, exc)
            if self._entries.get(key) is item:
                self._drop(key)
            self.stats.record("corrupt", len(data))
            self.stats.record("miss")
            return None
        self.stats.record("hit", len(data))
        return entry, [data]

    async def put(self, key: str, entry: CachedTrace) -> bool:
        if entry.nbytes > self.entry_limit:  # tensor bytes alone exceed it: not serialized
            self.stats.record("skip", entry.nbytes)
            return False
        return await self.put_encoded(key, await _encode(entry))

    async def put_encoded(self, key: str, data: bytes) -> bool:
        """`put` of an entry already serialized (`CachedTrace.to_bytes`)."""
        if len(data) > self.entry_limit:
            self.stats.record("skip", len(data))
            return False
        if key in self._entries:
            self._drop(key)
        expires = None if self.ttl_s is None else time.monotonic() + self.ttl_s
        self._entries[key] = (data, expires)
        self._bytes += len(data)
        while self._bytes > self.max_bytes:  # never reaches the new entry: it alone fits
            oldest = next(iter(self._entries))
            self.stats.record("eviction", self._drop(oldest))
        self.stats.record("write", len(data))
        return True

    async def delete(self, key: str) -> None:
        if key in self._entries:
            self._drop(key)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def describe(self) -> str:
        return "memory"


_FAILED = object()  # result of a Redis command that failed (already counted and logged)
Admission = Literal["send", "probe", "skip"]


class RedisTraceCache:
    """Redis-backed cache: `{prefix}trace:{key}` -> entry bytes, expiring after `ttl_s` (None: never; Redis's own
    maxmemory policy, ideally allkeys-lru, then bounds it).

    Never raises for backend problems. A connection failure or timeout opens the circuit breaker: for
    `retry_interval_s` every call is answered at once as a miss / not stored (counted as an error) without touching
    Redis; then a single call probes Redis again, and success closes the breaker. An error reply from the server
    (e.g. OOM when full) fails only that command: the server is answering, so the breaker stays closed and reads go on.
    """

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        ttl_s: float | None = DEFAULT_REDIS_TTL_S,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
    ) -> None:
        _check_limits(max_entry_bytes, ttl_s)
        if retry_interval_s < 0 or log_interval_s < 0:
            raise ValueError("retry_interval_s and log_interval_s must not be negative")
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes
        self.ttl_s = ttl_s
        self.retry_interval_s = retry_interval_s
        self.log_interval_s = log_interval_s
        self.stats = CacheStats()
        timeouts = {
            # A backstop only: each command runs under its own deadline sized to its value (see `_exec`).
            "socket_timeout": self._deadline_s(max_entry_bytes),
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        }
        # One retry on a connection error only: it replaces a pooled connection that died (e.g. Redis restarted) at
        # no visible cost, while a timeout is not retried so a hung Redis costs one timeout.
        retry = {"retries": 1, "supported_errors": (RedisConnectionError,)}
        try:
            self._client = aioredis.Redis.from_url(url, **timeouts, retry=Retry(NoBackoff(), **retry))
            # Large values are read by a synchronous client in a worker thread (`_get_in_pieces`).
            self._reader = redis.Redis.from_url(url, **timeouts, retry=SyncRetry(NoBackoff(), **retry))
        except ValueError as exc:
            raise ValueError(f"invalid Redis URL for the trace cache: {exc}") from None
        self._where = describe_redis(self._client)
        # circuit breaker
        self._down = False  # a connection failure was seen and no call has succeeded since
        self._down_until = 0.0  # monotonic time before which Redis is not tried while down
        self._probing = False  # a call is testing Redis after the retry interval; others still skip
        self.skipped_while_down = 0  # calls answered without trying Redis (total)
        # rate-limited logging
        self._failed_log = _LogThrottle(log_interval_s)
        self._corrupt_log = _LogThrottle(log_interval_s)
        self._skipped_since_log = 0
        self._outage_logged = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}trace:{key}"

    def _skipping(self) -> bool:
        return self._down and (self._probing or time.monotonic() < self._down_until)

    def _skip(self) -> bool:
        """True (and counted as an error) if the breaker answers this call without trying Redis."""
        if not self._skipping():
            return False
        self.skipped_while_down += 1
        self._skipped_since_log += 1
        self.stats.record("error")
        return True

    def _admit(self) -> Admission:
        """Whether a call may use Redis now; "probe" claims the one test call allowed after the retry interval."""
        if self._skip():
            return "skip"
        if self._down:
            self._probing = True
            return "probe"
        return "send"

    @staticmethod
    def _deadline_s(nbytes: int) -> float:
        """How long a command moving a value of `nbytes` may take before Redis counts as unresponsive."""
        return SOCKET_TIMEOUT_S + nbytes / TRANSFER_BYTES_PER_S

    async def _exec(self, op: str, command: Callable[[], Awaitable[Any]], admission: Admission, nbytes: int = 0) -> Any:
        """Run one admitted Redis command moving `nbytes` of value; its result, or _FAILED (counted, logged) on any
        failure, a deadline overrun included."""
        try:
            async with asyncio.timeout(self._deadline_s(nbytes)):
                result = await command()
        except ResponseError as exc:  # the server answered with an error (OOM when full, READONLY, ...)
            self._failure(op, exc, trip=False)
            return _FAILED
        except Exception as exc:  # connection refused/reset, timeouts, whatever redis-py raises on a broken socket
            self._failure(op, exc, trip=True)
            return _FAILED
        finally:
            if admission == "probe":
                self._probing = False  # also when cancelled: the next call may probe
        self._reachable()
        return result

    def _failure(self, op: str, exc: Exception, trip: bool) -> None:
        self.stats.record("error")
        if trip:
            self._down = True
            self._down_until = time.monotonic() + self.retry_interval_s
        else:
            self._reachable()
        n_failed = self._failed_log.tick()
        if n_failed:
            log.warning(
                "trace cache at %s: %d operation(s) failed and %d skipped while unreachable since the last report "
                "(last: %s: %s: %s); they are answered as misses, Redis is retried %.1f s after a connection failure",
                self._where,
                n_failed,
                self._skipped_since_log,
                op,
                type(exc).__name__,
                exc,
                self.retry_interval_s,
            )
            self._skipped_since_log = 0
            self._outage_logged = self._outage_logged or trip

    def _reachable(self) -> None:
        if not self._down:
            return
        self._down = False
        if self._outage_logged:
            self._outage_logged = False
            log.info("trace cache at %s is reachable again; caching resumed", self._where)

    async def get(self, key: str) -> CachedTrace | None:
        found = await self.get_with_value(key)
        return None if found is None else found[0]

    async def get_with_value(self, key: str) -> tuple[CachedTrace, list[bytes]] | None:
        admission = self._admit()
        if admission == "skip":
            return None
        rkey = self._key(key)
        # The value's size first, to give the GET a deadline that fits it (a miss costs this one round trip only).
        size = await self._exec("get", lambda: self._client.strlen(rkey), admission)
        if size is _FAILED:
            return None
        pieces = None
        if size:
            if size <= READ_PIECE_BYTES:
                pieces = await self._exec("get", lambda: self._get_whole(rkey), "send", nbytes=size)
            else:
                pieces = await self._exec("get", lambda: self._get_in_pieces(rkey, size), "send", nbytes=size)
            if pieces is _FAILED:
                return None
        if pieces is None:  # absent (or deleted between the two commands)
            self.stats.record("miss")
            return None
        nbytes = sum(map(len, pieces))
        try:
            entry = await _decode(pieces)
        except CorruptEntry as exc:
            self.stats.record("corrupt", nbytes)
            self.stats.record("miss")
            n_corrupt = self._corrupt_log.tick()
            if n_corrupt:
                log.warning(
                    "trace cache at %s: deleted %d corrupt value(s) since the last report (last: %s: %s)",
                    self._where,
                    n_corrupt,
                    rkey,
                    exc,
                )
            # Deleted so the next request recomputes and rewrites it instead of tripping over it again.
            admission = self._admit()
            if admission != "skip":
                await self._exec("delete", lambda: self._client.delete(rkey), admission)
            return None
        self.stats.record("hit", nbytes)
        return entry, pieces

    async def _get_whole(self, rkey: str) -> list[bytes] | None:
        data = await self._client.get(rkey)
        return None if data is None else [data]

    async def _get_in_pieces(self, rkey: str, size: int) -> list[bytes] | None:
        """A large value as GETRANGEs of READ_PIECE_BYTES, pipelined in one MULTI/EXEC (atomic: never parts of two
        writes). redis-py parses one huge bulk reply through a buffer that grows and is copied as it fills: a
        45 MiB GET took 117 ms here, these pieces 59 ms (docs/benchmarks.md). The pieces are decoded as they are
        (`CachedTrace.from_pieces`): joining them cost another 20-30 ms. None if the value is gone or was replaced
        by one of another size since `size` was read (a miss, not a corrupt entry).

        Read by the synchronous client in a worker thread: redis-py's asyncio client took 72-83 ms for the 45
        pieces of a 45 MiB value here, the synchronous one 59-61 ms (alone, nine reads each), and the parsing no
        longer holds the event loop, and so every other request of the gateway, for that long."""
        return await asyncio.to_thread(self._read_pieces, rkey, size)

    def _read_pieces(self, rkey: str, size: int) -> list[bytes] | None:
        with self._reader.pipeline(transaction=True) as pipe:
            for start in range(0, size, READ_PIECE_BYTES):
                pipe.getrange(rkey, start, min(size, start + READ_PIECE_BYTES) - 1)
            pieces = pipe.execute()
        return pieces if sum(map(len, pieces)) == size else None

    async def put(self, key: str, entry: CachedTrace) -> bool:
        if entry.nbytes > self.max_entry_bytes:  # tensor bytes alone exceed it: skip without serializing
            self.stats.record("skip", entry.nbytes)
            return False
        if self._skip():  # before serializing: no work for a value that cannot be sent
            return False
        return await self.put_encoded(key, await _encode(entry))

    async def put_encoded(self, key: str, data: bytes) -> bool:
        """`put` of an entry already serialized (`CachedTrace.to_bytes`)."""
        if len(data) > self.max_entry_bytes:
            self.stats.record("skip", len(data))
            return False
        admission = self._admit()  # (again, after `put`'s check: the state may have changed while serializing)
        if admission == "skip":
            return False
        rkey = self._key(key)
        px = None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))  # expiry in ms; None: never
        if await self._exec("put", lambda: self._client.set(rkey, data, px=px), admission, len(data)) is _FAILED:
            return False
        self.stats.record("write", len(data))
        return True

    async def delete(self, key: str) -> None:
        admission = self._admit()
        if admission != "skip":
            rkey = self._key(key)
            await self._exec("delete", lambda: self._client.delete(rkey), admission)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing sockets of a dead server must not fail a shutdown
            log.debug("closing trace cache client for %s: %s", self._where, exc)
        try:
            self._reader.close()  # also unblocks a read still waiting on a hung server
        except Exception as exc:
            log.debug("closing trace cache reader for %s: %s", self._where, exc)

    def describe(self) -> str:
        return self._where


class TieredTraceCache:
    """A bounded in-process cache (`near`) in front of a shared one (`far`: Redis).

    get: near first; on a near miss far, and a far hit is copied into near after the caller has its entry (the bytes
    read from far, already checked: joining them must not delay the response). put: serialized once, stored in both.
    With Redis down, entries held near are still served and new ones still kept near.

    Each tier keeps its own `stats`, which the metrics label by backend ("memory", "redis"); this cache's `stats`
    counts lookups as a whole: a hit in either tier is a hit, a miss in both is a miss.
    """

    def __init__(self, near: MemoryTraceCache, far: TraceCache) -> None:
        self.near = near
        self.far = far
        self.stats = CacheStats()
        self._fills: dict[str, asyncio.Task[bool]] = {}  # key -> copy into near in progress

    async def get(self, key: str) -> CachedTrace | None:
        found = await self.get_with_value(key)
        return None if found is None else found[0]

    async def get_with_value(self, key: str) -> tuple[CachedTrace, list[bytes]] | None:
        found = await self.near.get_with_value(key)
        if found is None:
            found = await self.far.get_with_value(key)
            if found is not None and key not in self._fills:
                self._fills[key] = asyncio.get_running_loop().create_task(self._fill(key, found[1]))
        if found is None:
            self.stats.record("miss")
            return None
        self.stats.record("hit", sum(map(len, found[1])))
        return found

    async def _fill(self, key: str, pieces: list[bytes]) -> bool:
        try:
            # b"".join of one piece returns it as it is: only several large pieces are worth a worker thread
            offload = len(pieces) > 1 and sum(map(len, pieces)) >= OFFLOAD_BYTES
            data = await asyncio.to_thread(b"".join, pieces) if offload else b"".join(pieces)
            return await self.near.put_encoded(key, data)
        except Exception:  # a failed copy costs a later far read, never a request
            log.warning("copying cached trace %s into process memory failed", key, exc_info=True)
            return False
        finally:
            self._fills.pop(key, None)

    @property
    def max_entry_bytes(self) -> int:
        return max(self.near.entry_limit, self.far.max_entry_bytes)

    async def put(self, key: str, entry: CachedTrace) -> bool:
        if entry.nbytes > self.max_entry_bytes:  # too large for either tier: skip without serializing
            for tier in (self.near, self.far):
                tier.stats.record("skip", entry.nbytes)
            return False
        return await self.put_encoded(key, await _encode(entry))  # serialized once for both

    async def put_encoded(self, key: str, data: bytes) -> bool:
        near = await self.near.put_encoded(key, data)
        far = await self.far.put_encoded(key, data)
        return near or far

    async def delete(self, key: str) -> None:
        await self.near.delete(key)
        await self.far.delete(key)

    async def close(self) -> None:
        for task in list(self._fills.values()):
            task.cancel()
        await asyncio.gather(*self._fills.values(), return_exceptions=True)
        await self.near.close()
        await self.far.close()

    def describe(self) -> str:
        return f"memory+{self.far.describe()}"


class _LogThrottle:
    """Counts occurrences of something worth a WARNING and says when to log them: at most once per interval."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._pending = 0
        self._last = -math.inf

    def tick(self) -> int:
        """Count one occurrence; how many to report now (those held back included), or 0 if it is too soon."""
        self._pending += 1
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return 0
        n, self._pending, self._last = self._pending, 0, now
        return n


def open_trace_cache(
    redis_url: str | None, prefix: str, max_bytes: int, max_entry_bytes: int, ttl_s: float | None, near: bool = True
) -> TraceCache:
    """An in-memory cache of `max_bytes`; with a Redis URL, Redis, behind such a cache unless `near` is False or
    `max_bytes` is 0.

    `max_bytes` bounds only the in-process memory: Redis is bounded by its own maxmemory setting.
    """
    if not redis_url:
        return MemoryTraceCache(max_bytes=max_bytes, max_entry_bytes=max_entry_bytes, ttl_s=ttl_s)
    far = RedisTraceCache(redis_url, prefix=prefix, max_entry_bytes=max_entry_bytes, ttl_s=ttl_s)
    if not near or max_bytes <= 0:
        return far
    return TieredTraceCache(MemoryTraceCache(max_bytes=max_bytes, max_entry_bytes=max_entry_bytes, ttl_s=ttl_s), far)
