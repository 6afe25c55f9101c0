"""A side channel from the engine worker to the gateway for per-token signals.

vLLM's request outputs carry token ids and logprobs, nothing else, and a `collective_rpc` per token would stall
the engine loop. So the worker pushes each step's signals over a Unix socket the gateway listens on: one
length-prefixed JSON frame per sampling step, written right after sampling, before vLLM ships the step's tokens.
The gateway matches them to tokens by (request key, token index), so the two paths may arrive in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field

from interpgw.core.errors import Internal

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 64 * 2**20


class SignalSender:
    """Worker side: blocking writes to the gateway's socket (a few KiB per step), reconnecting after a failure."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._last_warning = 0.0

    def send(self, records: list[dict]) -> None:
        if not records:
            return
        data = json.dumps(records, separators=(",", ":")).encode()
        frame = _HEADER.pack(len(data)) + data
        for _ in range(2):
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(self._path)
                    self._sock = sock
                self._sock.sendall(frame)
                return
            except OSError as exc:
                self.close()
                now = time.monotonic()
                if now - self._last_warning > 10:
                    self._last_warning = now
                    log.warning("sending token signals to %s failed: %s", self._path, exc)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


@dataclass
class _Inbox:
    items: dict[int, dict] = field(default_factory=dict)  # token index -> TokenSignals JSON
    error: str | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class SignalHub:
    """Gateway side: receives the worker's frames and hands each request its signals by token index."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="interpgw-")
        self.path = os.path.join(self._dir, "signals.sock")
        self._server: asyncio.AbstractServer | None = None
        self._inboxes: dict[str, _Inbox] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def expect(self, key: str) -> None:
        """Start keeping the signals of `key` (call before the request reaches the engine)."""
        self._inboxes[key] = _Inbox()

    def forget(self, key: str) -> None:
        self._inboxes.pop(key, None)

    async def take(self, key: str, index: int, timeout: float = 60.0) -> dict:
        """The signals of token `index` of `key`, waiting for them if they have not arrived yet."""
        inbox = self._inboxes.get(key)
        if inbox is None:
            raise Internal(f"no signals expected for request {key}")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            item = inbox.items.pop(index, None)
            if item is not None:
                return item
            if inbox.error is not None:
                raise Internal(f"token signals failed for this request (others are unaffected): {inbox.error}")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise Internal(f"token signals for token {index} did not arrive within {timeout:.0f} s")
            inbox.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inbox.arrived.wait(), remaining)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                if size > MAX_FRAME_BYTES:
                    log.error("token-signal frame of %d bytes refused; closing the channel", size)
                    return
                self._deliver(json.loads(await reader.readexactly(size)))
        except asyncio.IncompleteReadError:
            pass
        except Exception:  # noqa: BLE001 - a bad frame must not take the gateway down
            log.exception("token-signal channel failed")
        finally:
            writer.close()

    def _deliver(self, records: list[dict]) -> None:
        for record in records:
            inbox = self._inboxes.get(record.get("k", ""))
            if inbox is None:
                continue  # a request that was cancelled or never asked
            if "error" in record:
                inbox.error = str(record["error"])
            else:
                signals = record["s"]
                inbox.items.setdefault(int(signals["index"]), signals)
            inbox.arrived.set()
