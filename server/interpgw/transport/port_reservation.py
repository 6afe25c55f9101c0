"""Hold the gateway's listening ports while its engines load, so that a taken port fails the start at once.

The gRPC server and the /metrics HTTP server can only bind once the engines are up (they need the service), and
loading a model takes from seconds to minutes. Without a reservation two things go wrong in that time:
  - a port that is already taken is found out only after the model has loaded;
  - the port is free for anyone, and vLLM itself binds free ports for its own sockets while it starts (one of
    them took the gateway's port in a CI run).

A reservation binds the address (without listening: no connection is ever accepted or refused by it) and is
released just before the real server binds the same port (a window of microseconds instead of the whole load).

SO_REUSEADDR, as gRPC and http.server set it, so that a gateway restarted at once is not refused for its old
connections in TIME_WAIT. The price: two gateways started at the same moment on one port both reserve it, and the
second finds out when it binds for real, as it did without a reservation.
"""

from __future__ import annotations

import errno
import socket
from types import TracebackType


class PortReservation:
    """Bound, non-listening sockets on every address `host` resolves to, all on one port."""

    def __init__(self, host: str, port: int) -> None:
        """Binds now; raises OSError naming the address when it is taken or cannot be bound. Port 0 picks a free
        port (the same on every address), which `port` then holds."""
        self.host = host
        self._sockets: list[socket.socket] = []
        self.port = port
        errors: list[OSError] = []
        try:
            addresses = _bind_addresses(host, port)
            has_ipv4 = any(family == socket.AF_INET for family, _ in addresses)
            for family, address in addresses:
                if self.port != 0:
                    address = (address[0], self.port, *address[2:])
                try:
                    self._sockets.append(_bound_socket(family, address, dual_stack=not has_ipv4))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise OSError(exc.errno, f"{_show(host, self.port)} is already in use") from exc
                    errors.append(exc)  # e.g. ::1 in a container without IPv6; enough if another address binds
                    continue
                self.port = self._sockets[-1].getsockname()[1]
        except BaseException:
            self.release()
            raise
        if not self._sockets:
            detail = "; ".join(str(e) for e in errors) or "it resolves to no address"
            raise OSError(errno.EADDRNOTAVAIL, f"cannot bind {_show(host, port)}: {detail}")

    def release(self) -> None:
        """Frees the port for the real server; call it right before that server binds."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    @property
    def held(self) -> bool:
        return bool(self._sockets)

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _bind_addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """What a server given `host` binds: each resolved (family, sockaddr), without duplicates. `[::]` is `::`."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        found = socket.getaddrinfo(name or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {exc.strerror}") from exc
    unique: dict[tuple, int] = {}
    for family, _type, _proto, _canon, address in found:
        unique.setdefault(address, family)
    return [(family, address) for address, family in unique.items()]


def _bound_socket(family: int, address: tuple, dual_stack: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # `[::]` alone is both stacks, as gRPC binds it; beside an IPv4 address, IPv6 only (no self-conflict)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
