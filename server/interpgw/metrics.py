"""Prometheus metrics of the gateway, served on their own HTTP port (`/metrics`, `/healthz`).

Each `GatewayMetrics` owns its registry (not prometheus_client's global one), so tests can build several and
vLLM's own collectors never mix in. Labels are low-cardinality only: model id, RPC method, status code, cache
backend and event kind. Request ids, keys, prompts and client-chosen strings never become label values.
"""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

CACHE_EVENT_KINDS = frozenset({"hit", "miss", "error", "eviction", "corrupt", "write", "skip"})

# Every metric family, as written in PromQL (counters with their `_total`); deploy/ files may use only these.
METRIC_NAMES: frozenset[str] = frozenset(
    {
        # RPCs
        "interpgw_rpc_requests_total",
        "interpgw_rpc_duration_seconds",
        "interpgw_rpc_in_flight",
        "interpgw_queue_depth",
        "interpgw_time_to_first_token_seconds",
        "interpgw_prompt_tokens_total",
        "interpgw_generated_tokens_total",
        "interpgw_generation_tokens_per_second",
        # interpretability
        "interpgw_captured_bytes_total",
        "interpgw_captured_tensors_total",
        "interpgw_hook_seconds_total",
        "interpgw_forward_steps_total",
        "interpgw_batch_interventions",
        "interpgw_batch_steering_configs",
        "interpgw_registry_vectors",
        "interpgw_signal_tokens_total",
        "interpgw_monitor_events_total",
        # cache
        "interpgw_cache_events_total",
        "interpgw_cache_bytes_read_total",
        "interpgw_cache_bytes_written_total",
        "interpgw_cache_entry_bytes",
        "interpgw_cache_up",
        # engine
        "interpgw_engine_running_requests",
        "interpgw_engine_waiting_requests",
        "interpgw_engine_kv_cache_usage_ratio",
        "interpgw_engine_up",
        # access control and limits
        "interpgw_admission_requests",
        "interpgw_limit_rejections_total",
    }
)

# A CPU gateway streams generations for minutes: the RPC buckets reach well past the usual 10 s.
RPC_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_SECOND = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
PER_STEP_COUNTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
ENTRY_BYTES = tuple(float(2**k) for k in range(10, 30, 2)) + (float(512 * 2**20),)  # 1 KiB .. 512 MiB


class GatewayMetrics:
    """The gateway's metric families and the calls that record events into them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # RPCs
        self._rpc_requests = Counter(
            "interpgw_rpc_requests", "RPCs finished, by method and final gRPC status", ["method", "code"], registry=r
        )
        self._rpc_duration = Histogram(
            "interpgw_rpc_duration_seconds",
            "RPC wall time from arrival to final status (streams: to the last message)",
            ["method", "code"],
            buckets=RPC_SECONDS,
            registry=r,
        )
        self._rpc_in_flight = Gauge("interpgw_rpc_in_flight", "RPCs being served now", ["method"], registry=r)
        self._queue_depth = Gauge(
            "interpgw_queue_depth", "requests accepted by the gateway, not yet producing output", ["model"], registry=r
        )
        self._ttft = Histogram(
            "interpgw_time_to_first_token_seconds",
            "Generate: time from arrival to the first streamed token",
            ["model"],
            buckets=TTFT_SECONDS,
            registry=r,
        )
        self._prompt_tokens = Counter(
            "interpgw_prompt_tokens", "prompt tokens of finished generations", ["model"], registry=r
        )
        self._generated_tokens = Counter("interpgw_generated_tokens", "tokens generated", ["model"], registry=r)
        self._tokens_per_second = Histogram(
            "interpgw_generation_tokens_per_second",
            "generated tokens per second of each finished generation (arrival to done)",
            ["model"],
            buckets=TOKENS_PER_SECOND,
            registry=r,
        )
        # interpretability
        self._captured_bytes = Counter(
            "interpgw_captured_bytes", "activation bytes streamed to clients", ["model"], registry=r
        )
        self._captured_tensors = Counter(
            "interpgw_captured_tensors", "activation tensors streamed to clients", ["model"], registry=r
        )
        self._hook_seconds = Counter(
            "interpgw_hook_seconds", "time spent in capture/edit hooks inside forward steps", ["model"], registry=r
        )
        self._forward_steps = Counter(
            "interpgw_forward_steps",
            "forward steps the hooks saw (hook time per step = ratio of rates)",
            ["model"],
            registry=r,
        )
        self._signal_tokens = Counter(
            "interpgw_signal_tokens", "generated tokens streamed with hallucination signals", ["model"], registry=r
        )
        self._monitor_events = Counter(
            "interpgw_monitor_events", "monitors that fired, by action", ["model", "action"], registry=r
        )
        self._batch_interventions = Histogram(
            "interpgw_batch_interventions",
            "active interventions per forward step",
            ["model"],
            buckets=PER_STEP_COUNTS,
            registry=r,
        )
        self._batch_steering_configs = Histogram(
            "interpgw_batch_steering_configs",
            "distinct steering configurations per forward step",
            ["model"],
            buckets=PER_STEP_COUNTS,
            registry=r,
        )
        self._registry_vectors = Gauge("interpgw_registry_vectors", "steering vectors in the registry", registry=r)
        # cache
        self._cache_events = Counter(
            "interpgw_cache_events",
            "cache events by kind: hit, miss, error, eviction, corrupt, write, skip",
            ["backend", "kind"],
            registry=r,
        )
        self._cache_read = Counter(
            "interpgw_cache_bytes_read", "bytes read from the cache (hits and corrupt entries)", ["backend"], registry=r
        )
        self._cache_written = Counter(
            "interpgw_cache_bytes_written", "bytes written to the cache", ["backend"], registry=r
        )
        self._cache_entry_bytes = Histogram(
            "interpgw_cache_entry_bytes",
            "size of cache entries read (hits) and written",
            ["backend"],
            buckets=ENTRY_BYTES,
            registry=r,
        )
        self._cache_up = Gauge("interpgw_cache_up", "1 when the cache backend answers, else 0", ["backend"], registry=r)
        # engine
        self._engine_running = Gauge(
            "interpgw_engine_running_requests", "requests in vLLM's running batch", ["model"], registry=r
        )
        self._engine_waiting = Gauge(
            "interpgw_engine_waiting_requests", "requests waiting in vLLM's scheduler", ["model"], registry=r
        )
        self._engine_kv_usage = Gauge(
            "interpgw_engine_kv_cache_usage_ratio",
            "fraction of vLLM's KV-cache blocks in use (0..1)",
            ["model"],
            registry=r,
        )
        # access control and limits
        self._admission = Gauge(
            "interpgw_admission_requests",
            "engine-bound RPCs admitted (state=active) or queued for admission (state=waiting)",
            ["state"],
            registry=r,
        )
        self._rejections = Counter(
            "interpgw_limit_rejections",
            "requests refused by a limit (rate, concurrency, capture_bytes, max_tokens, admission)",
            ["limit"],
            registry=r,
        )
        self._engine_up = Gauge(
            "interpgw_engine_up", "1 while the model's engine is alive, else 0", ["model"], registry=r
        )
        self._http: http.server.ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ RPCs

    def rpc_started(self, method: str) -> float:
        """Counts the RPC as in flight; returns its start time, for `rpc_finished`'s duration."""
        self._rpc_in_flight.labels(method).inc()
        return time.perf_counter()

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """`code` is the gRPC status name (OK, INVALID_ARGUMENT, CANCELLED, ...). Call once per `rpc_started`."""
        self._rpc_in_flight.labels(method).dec()
        self._rpc_requests.labels(method, code).inc()
        self._rpc_duration.labels(method, code).observe(max(0.0, seconds))

    def queue_depth(self, model: str, n: int) -> None:
        self._queue_depth.labels(model).set(n)

    def first_token(self, model: str, seconds: float) -> None:
        self._ttft.labels(model).observe(max(0.0, seconds))

    def tokens(self, model: str, prompt: int, generated: int, seconds: float) -> None:
        """One finished generation: its prompt and generated token counts and its duration."""
        self._prompt_tokens.labels(model).inc(max(0, prompt))
        self._generated_tokens.labels(model).inc(max(0, generated))
        if generated > 0 and seconds > 0:
            self._tokens_per_second.labels(model).observe(generated / seconds)

    # ------------------------------------------------------------------ interpretability

    def captured(self, model: str, nbytes: int, ntensors: int) -> None:
        self._captured_bytes.labels(model).inc(max(0, nbytes))
        self._captured_tensors.labels(model).inc(max(0, ntensors))

    def hook_stats(
        self,
        model: str,
        seconds: float,
        steps: int,
        interventions_per_step: Iterable[int] = (),
        configs_per_step: Iterable[int] = (),
    ) -> None:
        """What the worker reports for a span of forward steps: hook time, step count and per-step batch shape."""
        self._hook_seconds.labels(model).inc(max(0.0, seconds))
        self._forward_steps.labels(model).inc(max(0, steps))
        interventions = self._batch_interventions.labels(model)
        for n in interventions_per_step:
            interventions.observe(n)
        configs = self._batch_steering_configs.labels(model)
        for n in configs_per_step:
            configs.observe(n)

    def signal_tokens(self, model: str, n: int) -> None:
        self._signal_tokens.labels(model).inc(n)

    def monitor_event(self, model: str, action: str) -> None:
        if action in ("flag", "stop", "steer"):
            self._monitor_events.labels(model, action).inc()

    def registry_size(self, n: int) -> None:
        self._registry_vectors.set(n)

    # ------------------------------------------------------------------ cache

    def cache_event(self, backend: str, kind: str, nbytes: int = 0) -> None:
        """One cache event. Bytes count as read for `hit`/`corrupt`, as written for `write`; entry sizes are
        observed for hits and writes. An unknown kind is a programming error (it would grow the label set)."""
        if kind not in CACHE_EVENT_KINDS:
            raise ValueError(f"unknown cache event kind {kind!r}; expected one of {sorted(CACHE_EVENT_KINDS)}")
        self._cache_events.labels(backend, kind).inc()
        if nbytes <= 0:
            return
        if kind in ("hit", "corrupt"):
            self._cache_read.labels(backend).inc(nbytes)
        elif kind == "write":
            self._cache_written.labels(backend).inc(nbytes)
        if kind in ("hit", "write"):
            self._cache_entry_bytes.labels(backend).observe(nbytes)

    def cache_callback(self, backend: str) -> Callable[[str, int], None]:
        """An `on_event(kind, nbytes)` callback for one cache backend."""
        return functools.partial(self.cache_event, backend)

    def cache_up(self, backend: str, up: bool) -> None:
        self._cache_up.labels(backend).set(1 if up else 0)

    # ------------------------------------------------------------------ engine

    def engine_stats(self, model: str, running: int, waiting: int, kv_usage: float) -> None:
        """vLLM's scheduler numbers (see `engine.stat_logger`): running and waiting requests, KV usage 0..1."""
        self._engine_running.labels(model).set(running)
        self._engine_waiting.labels(model).set(waiting)
        self._engine_kv_usage.labels(model).set(kv_usage)

    def engine_up(self, model: str, up: bool) -> None:
        self._engine_up.labels(model).set(1 if up else 0)

    # ------------------------------------------------------------------ access control and limits

    def admission(self, active: int, waiting: int) -> None:
        self._admission.labels("active").set(active)
        self._admission.labels("waiting").set(waiting)

    def rejected(self, limit: str) -> None:
        self._rejections.labels(limit).inc()

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)

    def start_http_server(self, host: str, port: int) -> int:
        """Serves /metrics and /healthz from a daemon thread; port 0 picks a free one. Returns the actual port."""
        if self._http is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        server = _server_class(host)((host, port), _handler(self))
        self._http = server
        self._http_thread = threading.Thread(target=server.serve_forever, name="interpgw-metrics", daemon=True)
        self._http_thread.start()
        return int(server.server_address[1])

    def stop_http_server(self) -> None:
        server, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _server_class(host: str) -> type[http.server.ThreadingHTTPServer]:
    class MetricsHTTPServer(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return MetricsHTTPServer


def _handler(metrics: GatewayMetrics) -> type[http.server.BaseHTTPRequestHandler]:
    class MetricsHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, metrics.render())
            elif path == "/healthz":
                self._reply(200, "text/plain; charset=utf-8", b"ok\n")
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes every few seconds
            log.debug("metrics http: " + format, *args)

    return MetricsHandler
