"""Unit tests of the port reservation that `interpgw serve` holds while its engines load: real sockets, no server."""

from __future__ import annotations

import errno
import socket
from concurrent import futures

import grpc
import pytest

from interpgw.transport.port_reservation import PortReservation


def plain_bind(port: int, host: str = "127.0.0.1") -> OSError | None:
    """The error a socket without SO_REUSEADDR gets binding (host, port), or None when it could."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def test_port_zero_picks_a_port_that_is_held_until_released() -> None:
    reservation = PortReservation("127.0.0.1", 0)
    assert reservation.held and reservation.port > 0
    taken = plain_bind(reservation.port)
    assert taken is not None and taken.errno == errno.EADDRINUSE  # nobody else gets it while the engine loads
    reservation.release()
    assert not reservation.held
    assert plain_bind(reservation.port) is None
    reservation.release()  # a second release is harmless: serve releases on every exit path


def test_a_listening_port_is_refused_at_once_with_the_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(OSError, match=rf"^\[Errno {errno.EADDRINUSE}\] 127\.0\.0\.1:{port} is already in use$"):
            PortReservation("127.0.0.1", port)


def test_a_grpc_server_binds_the_released_port() -> None:
    """The real sequence: reserve, release, then gRPC (no SO_REUSEPORT, as GatewayServer binds) takes the port."""
    with PortReservation("127.0.0.1", 0) as reservation:
        port = reservation.port
    server = grpc.server(futures.ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 0)])
    try:
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    finally:
        server.stop(None)


def test_localhost_holds_the_same_port_on_each_of_its_addresses() -> None:
    with PortReservation("localhost", 0) as reservation:
        assert reservation.held
        bound = {sock.getsockname()[1] for sock in reservation._sockets}
        assert bound == {reservation.port}
        taken = plain_bind(reservation.port)
        assert taken is not None and taken.errno == errno.EADDRINUSE


def test_an_unknown_host_is_refused_with_its_name() -> None:
    with pytest.raises(OSError, match="cannot resolve 'no-such-host.invalid'"):
        PortReservation("no-such-host.invalid", 0)
