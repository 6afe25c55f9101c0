"""How the gateway connects to a Redis server (failing fast when it is down) and names it in logs and errors: its
address, never its credentials."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

SOCKET_TIMEOUT_S = 2.0


def connect_redis(url: str) -> aioredis.Redis:
    """An asyncio client for `url`; ValueError for a malformed URL (nothing is contacted yet)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        # redis-py's default (10 retries) would hold a request for many seconds when Redis is down.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
    )


def describe_redis(client: Any) -> str:
    """The server address of a redis-py client: "redis://host:port/db" (or unix://path?db=N), no password."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
