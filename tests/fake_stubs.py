"""Helpers for SDK tests without a server."""

from __future__ import annotations

from typing import Any


class AsyncStub:
    """A synchronous fake stub seen as a grpc.aio stub: its RPC methods (capitalised names) become coroutines."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        if not name[0].isupper():
            return method

        async def call(request: object, **kwargs: object) -> object:
            return method(request, **kwargs)

        return call
