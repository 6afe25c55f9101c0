"""Turns a request's `authorization` metadata into the Caller it speaks for, without a store round trip per request."""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from interpgw.auth.keys import ROLES, ApiKey, KeyLimits, hash_secret
from interpgw.auth.keystore import KeyStore
from interpgw.core.errors import Unauthenticated, Unavailable

log = logging.getLogger(__name__)

NEGATIVE_TTL_S = 1.0
OUTAGE_WARNING_INTERVAL_S = 30.0
_BEARER = re.compile(r"bearer +(\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant whose registry entries they see, their roles and limits."""

    tenant: str
    roles: frozenset[str]
    key_id: str
    limits: KeyLimits = KeyLimits()

    def has(self, role: str) -> bool:
        return role in self.roles


LOCAL_CALLER = Caller(tenant="", roles=frozenset(ROLES), key_id="local")  # auth off: one local user with every role


class Authenticator:
    """Checks bearer secrets against a key store, caching by the secret's hash (never the secret itself).

    A known key is served from the cache for `cache_ttl_s`, so a revoked key keeps working on this replica for up to
    that long. An unknown one is remembered for one second, so a flood of wrong keys does not hammer the store. When
    the store is unreachable, keys seen before keep working from their last known record; others get Unavailable.
    """

    def __init__(
        self,
        store: KeyStore,
        cache_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 10_000,
    ) -> None:
        self.store = store
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._max_cached = max_cached
        self._known: OrderedDict[str, tuple[float, ApiKey]] = OrderedDict()  # hash -> (fresh until, record), LRU
        self._unknown: OrderedDict[str, float] = OrderedDict()  # hash -> rejected until, oldest first
        self._last_outage_warning: float | None = None

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller for an `authorization` metadata value; Unauthenticated or Unavailable if there is none."""
        if not authorization:
            raise Unauthenticated("missing API key: send gRPC metadata 'authorization: Bearer <key>'")
        match = _BEARER.fullmatch(authorization.strip())
        if match is None:
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        sha256 = hash_secret(match.group(1))
        now = self._clock()

        cached = self._known.get(sha256)
        if cached is not None:
            self._known.move_to_end(sha256)
            if now < cached[0]:
                return _caller(cached[1])
        elif sha256 in self._unknown and now < self._unknown[sha256]:
            raise Unauthenticated("unknown or revoked API key")

        try:
            key = await self.store.lookup(sha256)
        except Unavailable as exc:
            self._warn_outage(now, exc)
            if cached is not None:
                return _caller(cached[1])
            raise Unavailable("cannot verify the API key now: key store unreachable") from None

        if key is None:
            self._known.pop(sha256, None)
            self._remember(self._unknown, sha256, now + NEGATIVE_TTL_S)
            raise Unauthenticated("unknown or revoked API key")
        self._unknown.pop(sha256, None)
        self._remember(self._known, sha256, (now + self.cache_ttl_s, key))
        return _caller(key)

    def _remember(self, cache: OrderedDict, sha256: str, value: object) -> None:
        cache[sha256] = value
        cache.move_to_end(sha256)
        while len(cache) > self._max_cached:
            cache.popitem(last=False)

    def _warn_outage(self, now: float, exc: Unavailable) -> None:
        if self._last_outage_warning is None or now - self._last_outage_warning >= OUTAGE_WARNING_INTERVAL_S:
            self._last_outage_warning = now
            log.warning("API key store %s unreachable, serving keys seen before: %s", self.store.describe(), exc)


def _caller(key: ApiKey) -> Caller:
    return Caller(tenant=key.tenant, roles=key.roles, key_id=key.id, limits=key.limits)
