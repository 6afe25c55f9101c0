"""How the gateway names a Redis server in logs and errors: its address, never its credentials."""

from __future__ import annotations

from typing import Any


def describe_redis(client: Any) -> str:
    """The server address of a redis-py client: "redis://host:port/db" (or unix://path?db=N), no password."""
    kwargs = client.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
