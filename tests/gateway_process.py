"""Start a real `interpgw serve` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from interpgw_client import Client


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_TAKEN = "Failed to bind to address"  # what the gateway logs when its gRPC port is taken
PORT_ATTEMPTS = 3


class GatewayProcess:
    """A gateway subprocess; `address` is host:port. Logs go to a temp file, shown if start-up fails."""

    def __init__(
        self,
        *args: str,
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        credentials: Any = None,  # grpc.ChannelCredentials of a TLS gateway, for the readiness check
    ) -> None:
        self.credentials = credentials
        self.metrics_url: str | None = None
        if "--metrics-port" not in args:
            args = (*args, "--metrics-port", "0")  # a free port: several gateways run at once in the tests
        for attempt in range(PORT_ATTEMPTS):
            self._launch(args, env)
            try:
                self._wait_ready(startup_timeout)
                return
            except RuntimeError:
                # The free port was released for the gateway to bind after its engine started; vLLM's engine may
                # have taken it meanwhile for one of its own sockets. A new port, then.
                lost_port = PORT_TAKEN in self.log_path.read_text(errors="replace")
                self.stop()
                if not lost_port or attempt == PORT_ATTEMPTS - 1:
                    raise
            except BaseException:  # timed out or interrupted (Ctrl-C, SIGTERM in a benchmark): leave nothing behind
                self.stop()
                raise

    def _launch(self, args: tuple[str, ...], env: dict[str, str] | None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="interpgw-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "interpgw.serve", "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.address, credentials=self.credentials) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    client.wait_ready(timeout=2.0)
                    self.metrics_url = self._metrics_url()
                    return
                except Exception:  # noqa: BLE001 - not up yet
                    time.sleep(1.0)
        raise TimeoutError(f"gateway not ready after {timeout}s:\n{self.log_tail()}")

    def _metrics_url(self) -> str | None:
        """From the line `interpgw: metrics on http://HOST:PORT/metrics` the server prints once it is up."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self._log.flush()
            match = re.search(r"metrics on (http://\S+/metrics)", self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            time.sleep(0.1)
        return None

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """Every sample on the gateway's /metrics: (name, sorted labels) -> value."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        assert self.metrics_url, "the gateway did not print its metrics address"
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def rss_bytes(self) -> int:
        """Resident memory of the gateway and every process it started (vLLM's engine core and worker)."""
        import psutil

        root = psutil.Process(self.process.pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), then make sure no process of the group (vLLM's engine) outlives it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()
        return self.process.returncode


def run_cli(address: str, *args: str) -> subprocess.CompletedProcess:
    """The `interpgw` CLI against a gateway, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "interpgw_client.cli", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
