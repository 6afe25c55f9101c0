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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interpgw_client import Client


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVING_LINE = re.compile(r"^interpgw: serving .+ on \S+:(\d+)$", re.MULTILINE)  # printed once it listens


class GatewayProcess:
    """A gateway subprocess; `address` is host:port. Logs go to a temp file, shown if start-up fails.

    The gateway is started with `--port 0`: it picks a free port when it starts and holds it while its engine
    loads, so no other process (vLLM's own sockets included) can take it; the port is read from its log."""

    def __init__(
        self,
        *args: str,
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        credentials: Any = None,  # grpc.ChannelCredentials of a TLS gateway, for the readiness check
    ) -> None:
        self.credentials = credentials
        self.metrics_url: str | None = None
        self.port: int | None = None
        self.address: str | None = None
        if "--metrics-port" not in args:
            args = (*args, "--metrics-port", "0")  # a free port: several gateways run at once in the tests
        self.log_path = Path(tempfile.mkstemp(prefix="interpgw-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "interpgw.serve", "--port", "0", *args]
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            self._wait_ready(startup_timeout)
        except BaseException:  # failed, timed out or interrupted (Ctrl-C, SIGTERM in a benchmark): leave nothing
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (match := SERVING_LINE.search(self.log_path.read_text(errors="replace"))) is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not listening after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.port = int(match.group(1))
        self.address = f"127.0.0.1:{self.port}"
        try:  # the line is printed once health says SERVING: this is one check, not another wait
            with Client(self.address, credentials=self.credentials) as client:
                client.wait_ready(timeout=30.0)
        except Exception as exc:
            raise RuntimeError(f"gateway printed its address but is not serving ({exc}):\n{self.log_tail()}") from None
        self.metrics_url = self._metrics_url()

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

    def scrape_until(self, condition: Callable[[dict], bool], timeout_s: float) -> dict:
        """Scrape /metrics until `condition(samples)` holds or `timeout_s` passes; the last scrape either way (the
        caller asserts on it, with a message naming what it waited for)."""
        deadline = time.monotonic() + timeout_s
        while not condition(samples := self.scrape()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return samples

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
