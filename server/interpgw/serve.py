"""`interpgw serve`: start the engine(s), then the gRPC server; drain and stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from interpgw.config import AuthConfig, CacheConfig, EngineConfig, LimitsConfig, ServerConfig, TlsConfig
from interpgw.transport.port_reservation import PortReservation
from interpgw_client.allocator import DEFAULT_KEEP_BYTES, keep_freed_memory

log = logging.getLogger("interpgw")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="interpgw serve", description=__doc__)
    e, lim, srv = EngineConfig(), LimitsConfig(), ServerConfig()
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model folder or hub id (default: SmolLM2-135M-Instruct); repeat to serve several models, each with "
        "its own engine (the first is the default model)",
    )
    parser.add_argument(
        "--served-model-id",
        action="append",
        default=None,
        help="id clients use (default: the folder name); repeat in the order of --model",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--dtype", default=e.dtype, choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max-model-len", type=int, default=e.max_model_len)
    parser.add_argument("--max-num-seqs", type=int, default=e.max_num_seqs)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per engine step; small values force chunked prefill",
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--kv-cache-gib", type=float, default=e.kv_cache_gib)
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=e.tensor_parallel_size, help="split each layer across N ranks"
    )
    parser.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=e.pipeline_parallel_size,
        help="split the layers into N stages (captures, edits and signals need 1)",
    )
    parser.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray"],
        default=None,
        help="how vLLM runs its ranks: mp (processes on this node) or ray (a Ray cluster, multi-node)",
    )
    parser.add_argument("--max-logprobs", type=int, default=e.max_logprobs)
    parser.add_argument("--max-capture-bytes", type=int, default=lim.max_capture_bytes)
    parser.add_argument("--max-trace-prompts", type=int, default=lim.max_trace_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=lim.max_new_tokens)
    parser.add_argument(
        "--redis-url",
        default=None,
        help="redis://host:port/db: steering vectors, the trace cache and stored traces survive restarts and are "
        "shared by replicas (default: all in process memory)",
    )
    parser.add_argument("--redis-prefix", default="interpgw:", help="key prefix in Redis")
    parser.add_argument("--max-interventions", type=int, default=lim.max_interventions)
    parser.add_argument("--max-edit-scale", type=float, default=lim.max_edit_scale)
    parser.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds to drain streams on stop")
    parser.add_argument("--enable-fault-injection", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-startup-probe", action="store_true", help="skip the hooks-fire check at start-up")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=srv.metrics_port,
        help="Prometheus /metrics HTTP port; 0: a free port; -1: off",
    )
    parser.add_argument(
        "--cache-max-bytes",
        type=int,
        default=CacheConfig().max_bytes,
        help="in-process trace cache budget (with Redis: of the copies kept in front of it; 0: none)",
    )
    parser.add_argument(
        "--cache-max-entry-bytes", type=int, default=CacheConfig().max_entry_bytes, help="larger traces are not cached"
    )
    parser.add_argument("--cache-ttl", type=float, default=CacheConfig().ttl_s, help="seconds a cached trace lives")
    parser.add_argument(
        "--stored-trace-ttl", type=float, default=CacheConfig().stored_ttl_s, help="seconds a stored trace lives"
    )
    parser.add_argument("--metrics-host", default=srv.metrics_host, help="address the /metrics server listens on")
    access = parser.add_argument_group("authentication and TLS")
    access.add_argument(
        "--auth",
        choices=["auto", "on", "off"],
        default="auto",
        help="API keys: auto = on unless --host is a loopback address (default), on, off",
    )
    access.add_argument("--api-keys", metavar="FILE", help="YAML file of hashed API keys (create with `interpgw keys`)")
    access.add_argument(
        "--api-keys-in-redis", action="store_true", help="API keys in the --redis-url Redis (admins manage them by RPC)"
    )
    access.add_argument("--key-cache-ttl", type=float, default=AuthConfig().key_cache_ttl_s, help=argparse.SUPPRESS)
    access.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS (with --tls-key)")
    access.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    access.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    limits = parser.add_argument_group("limits and backpressure")
    limits.add_argument("--max-message-bytes", type=int, default=lim.max_message_bytes)
    limits.add_argument("--max-active-requests", type=int, default=lim.max_active_requests)
    limits.add_argument("--max-queued-requests", type=int, default=lim.max_queued_requests)
    limits.add_argument("--key-rate", type=float, default=None, help="default requests/s per API key")
    limits.add_argument("--key-burst", type=int, default=None, help="default burst per API key")
    limits.add_argument("--key-max-concurrent", type=int, default=None, help="default calls in flight per API key")
    limits.add_argument(
        "--key-capture-bytes-per-min", type=int, default=None, help="default captured bytes per minute per API key"
    )
    parser.add_argument(
        "--malloc-keep-mib",
        type=int,
        default=DEFAULT_KEEP_BYTES // 2**20,
        help="freed memory (MiB) this process and vLLM's keep for reuse instead of returning it to the kernel "
        "(glibc; large traces then skip page faults); 0: glibc's defaults",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    models = args.model or [EngineConfig().model]
    ids = args.served_model_id or []
    if len(ids) > len(models):
        raise SystemExit("interpgw serve: more --served-model-id than --model flags")
    ids = ids + [None] * (len(models) - len(ids))
    return ServerConfig(
        host=args.host,
        port=args.port,
        more_models=list(zip(models[1:], ids[1:], strict=True)),
        engine=EngineConfig(
            model=models[0],
            served_model_id=ids[0],
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
            kv_cache_gib=args.kv_cache_gib,
            max_logprobs=args.max_logprobs,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            distributed_executor_backend=args.distributed_executor_backend,
        ),
        limits=LimitsConfig(
            max_capture_bytes=args.max_capture_bytes,
            max_trace_prompts=args.max_trace_prompts,
            max_new_tokens=args.max_new_tokens,
            max_interventions=args.max_interventions,
            max_edit_scale=args.max_edit_scale,
            max_message_bytes=args.max_message_bytes,
            max_active_requests=args.max_active_requests,
            max_queued_requests=args.max_queued_requests,
            key_requests_per_s=args.key_rate,
            key_burst=args.key_burst,
            key_max_concurrent=args.key_max_concurrent,
            key_capture_bytes_per_min=args.key_capture_bytes_per_min,
        ),
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        enable_fault_injection=args.enable_fault_injection,
        startup_probe=not args.no_startup_probe,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        cache=CacheConfig(
            max_bytes=args.cache_max_bytes,
            max_entry_bytes=args.cache_max_entry_bytes,
            ttl_s=args.cache_ttl,
            stored_ttl_s=args.stored_trace_ttl,
        ),
        auth=AuthConfig(
            mode=args.auth,
            api_keys_file=args.api_keys,
            api_keys_in_redis=args.api_keys_in_redis,
            key_cache_ttl_s=args.key_cache_ttl,
        ),
        tls=TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca),
    )


async def run(config: ServerConfig, shutdown_grace: float = 10.0) -> None:
    from interpgw.core.errors import InvalidArgument
    from interpgw.models.resolve import model_argument_error
    from interpgw.transport.server import server_credentials

    for engine_config in config.engine_configs():  # configuration mistakes end the start now, before engines load
        if (error := model_argument_error(engine_config.model)) is not None:
            raise SystemExit(f"interpgw serve: --model {error}")
    keys = _key_store(config)
    try:
        credentials = server_credentials(config.tls)
    except (InvalidArgument, OSError) as exc:
        raise SystemExit(f"interpgw serve: TLS: {exc}") from None
    grpc_port, metrics_port = _reserve_ports(config)  # a taken port, too, ends the start before the engine loads
    try:
        await _run_reserved(config, shutdown_grace, keys, credentials, grpc_port, metrics_port)
    finally:
        grpc_port.release()
        if metrics_port is not None:
            metrics_port.release()


def _reserve_ports(config: ServerConfig) -> tuple[PortReservation, PortReservation | None]:
    """The gRPC port, and the metrics port when it is fixed, held until their servers bind them. A metrics port
    of 0 needs no reservation: its server picks a free port as it binds."""
    try:
        grpc_port = PortReservation(config.host, config.port)
    except OSError as exc:
        raise SystemExit(f"interpgw serve: cannot serve gRPC: {exc.strerror or exc} (choose another --port)") from None
    if config.metrics_port <= 0:
        return grpc_port, None
    try:
        return grpc_port, PortReservation(config.metrics_host, config.metrics_port)
    except OSError as exc:
        grpc_port.release()
        raise SystemExit(
            f"interpgw serve: cannot serve /metrics: {exc.strerror or exc} (choose another --metrics-port, or -1)"
        ) from None


async def _run_reserved(
    config: ServerConfig,
    shutdown_grace: float,
    keys: Any,
    credentials: Any,
    grpc_port: PortReservation,
    metrics_port: PortReservation | None,
) -> None:
    from transformers import AutoTokenizer

    from interpgw.auth.authenticator import Authenticator
    from interpgw.auth.management import KeyManagement
    from interpgw.core.prompts import PromptEncoder
    from interpgw.metrics import GatewayMetrics
    from interpgw.models.fingerprint import weights_fingerprint
    from interpgw.registry.store import open_vector_store
    from interpgw.service import GatewayService, ServedModel
    from interpgw.transport.guard import CallGuard
    from interpgw.transport.server import GatewayServer

    vectors = open_vector_store(config.redis_url, config.redis_prefix)
    await vectors.ping()  # a wrong --redis-url fails now, not on the first steering request
    if keys is not None:
        await keys.ping()
    metrics = GatewayMetrics() if config.metrics_port >= 0 else None
    traces = _trace_repository(config, metrics)
    # Signals are handled from the start: a stop during start-up must not orphan vLLM's engine processes.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(_start_engines(config, metrics))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("interpgw: stopped during start-up; ending the engine processes")
        _kill_descendants()
        await asyncio.wait({starting}, timeout=15)
        _kill_descendants()  # the start-up thread may have launched more meanwhile
        return
    stopping.cancel()
    try:
        engines = starting.result()
    except StartupError as exc:  # SystemExit raised inside the task would come with a traceback
        raise SystemExit(str(exc)) from None
    pollers: list[asyncio.Future] = []
    watchdog: asyncio.Future | None = None
    try:  # from here on every exit ends the engines: a server that cannot bind included
        served = []
        for engine in engines:
            facts = engine.facts
            tokenizer = AutoTokenizer.from_pretrained(facts.source)
            served.append(
                ServedModel(
                    engine=engine,
                    encoder=PromptEncoder(tokenizer, facts.vocab_size, facts.max_model_len),
                    max_logprobs=config.engine.max_logprobs,
                    revision=await asyncio.to_thread(weights_fingerprint, facts.source),
                )
            )
        service = GatewayService(
            served,
            config.limits,
            allow_faults=config.enable_fault_injection,
            vectors=vectors,
            traces=traces,
            metrics=metrics,
        )
        authenticator = Authenticator(keys, config.auth.key_cache_ttl_s) if keys is not None else None
        guard = CallGuard(config.limits, authenticator, quotas=service.quotas, metrics=metrics)
        grpc_port.release()  # right before gRPC binds the same port (the one it picked, for --port 0)
        server = GatewayServer(
            service,
            config.host,
            grpc_port.port,
            config.limits.max_message_bytes,
            metrics=metrics,
            guard=guard,
            keys=KeyManagement(keys),
            credentials=credentials,
        )
        await server.start()
        for engine in engines:
            facts = engine.facts
            log.info(
                "interpgw: serving %s (%s, %d layers, d_model %d, %s) on %s:%d",
                facts.id,
                facts.architecture,
                facts.n_layers,
                facts.d_model,
                facts.dtype,
                config.host,
                server.port,
            )
        log.info("interpgw: vectors in %s; traces in %s", vectors.describe(), traces.describe())
        model_ids = ", ".join(e.facts.id for e in engines)
        print(f"interpgw: serving {model_ids} on {config.host}:{server.port}", flush=True)
        log.info(
            "interpgw: authentication %s; %s",
            f"on, keys in {keys.describe()}" if keys is not None else "off (every caller is the local user)",
            "TLS" + (" with client certificates" if config.tls.client_ca else "") if credentials else "plain TCP",
        )
        if credentials is None and not _is_loopback(config.host):
            log.warning(
                "interpgw: listening on %s without TLS: API keys and data cross the network in clear", config.host
            )

        engine_died = asyncio.Event()
        watchdog = asyncio.ensure_future(_watch_engines(engines, engine_died))
        if metrics is not None:
            if metrics_port is not None:
                metrics_port.release()  # right before the HTTP server binds it
            bound = metrics.start_http_server(config.metrics_host, config.metrics_port)
            host = f"[{config.metrics_host}]" if ":" in config.metrics_host else config.metrics_host
            print(f"interpgw: metrics on http://{host}:{bound}/metrics", flush=True)
            for engine in engines:
                metrics.engine_up(engine.facts.id, True)
                pollers.append(asyncio.ensure_future(_poll_hook_stats(engine, metrics, engine.facts.id)))
        stopping = asyncio.ensure_future(stop.wait())
        dying = asyncio.ensure_future(engine_died.wait())
        await asyncio.wait({stopping, dying}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        dying.cancel()
        if engine_died.is_set():
            # Nothing can be served without the engine: say so to health checks (a load balancer or Kubernetes
            # moves traffic away), fail what is in flight with UNAVAILABLE, and exit non-zero so a supervisor
            # restarts the process with a fresh engine.
            dead = [e.facts.id for e in engines if e.dead()]
            log.error(
                "interpgw: the model engine of %s died; health NOT_SERVING, exiting with status %d",
                ", ".join(dead),
                ENGINE_DIED_EXIT,
            )
            if metrics is not None:
                for model_id in dead:
                    metrics.engine_up(model_id, False)
            await server.stop(min(shutdown_grace, 2.0))
            raise SystemExit(ENGINE_DIED_EXIT)
        log.info("interpgw: shutting down (grace %.0fs)", shutdown_grace)
        await server.stop(shutdown_grace)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for poller in pollers:
            poller.cancel()
        if metrics is not None:
            metrics.stop_http_server()
        for engine in engines:
            await engine.shutdown()
        await vectors.close()
        await traces.close()


class StartupError(Exception):
    """A start-up failure the user fixes with a flag: its message is all they need, not a traceback."""


ENGINE_DIED_EXIT = 3  # exit status when the engine process died: distinct from a crash (1) and a bad flag (2)


async def _start_engines(config: ServerConfig, metrics: Any) -> list[Any]:
    """One vLLM engine per model, started one after another (each loads its weights and sizes its KV cache)."""
    from interpgw.engine.vllm_engine import VllmEngine

    engines: list[Any] = []
    try:
        for engine_config in config.engine_configs():
            label = {"id": engine_config.served_model_id or ""}  # the served id is known once the engine is up
            on_stats = None
            if metrics is not None:

                def on_stats(running: int, waiting: int, kv_usage: float, label: dict = label) -> None:
                    metrics.engine_stats(label["id"], running, waiting, kv_usage)

            try:
                engine = await VllmEngine.start(
                    engine_config,
                    allow_faults=config.enable_fault_injection,
                    probe=config.startup_probe,
                    on_stats=on_stats,
                )
            except OSError as exc:
                if Path(engine_config.model).expanduser().exists():
                    raise  # a local model that failed to load: the traceback says where
                raise StartupError(  # a hub id neither reachable nor in the Hugging Face cache: no traceback needed
                    f"interpgw serve: cannot load --model {engine_config.model!r} from the hub or its cache: {exc}"
                ) from None
            label["id"] = engine.facts.id
            engines.append(engine)
            if len({e.facts.id for e in engines}) < len(engines):
                served_as = engine.facts.id
                raise StartupError(f"interpgw serve: two models are served as {served_as!r}: set --served-model-id")
    except BaseException:
        for engine in engines:
            await engine.shutdown()
        raise
    return engines


async def _watch_engines(engines: list[Any], died: asyncio.Event, interval_s: float = 0.5) -> None:
    """Sets `died` once vLLM reports any engine dead (its process crashed or was killed)."""
    while not any(engine.dead() for engine in engines):
        await asyncio.sleep(interval_s)
    died.set()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve beyond this machine


def _key_store(config: ServerConfig) -> Any:
    """The API-key store when authentication is on, else None; exits with a clear message on contradictory flags.

    `--auth auto` turns authentication on when keys are configured or the gateway listens beyond loopback."""
    from interpgw.auth.keystore import open_key_store

    auth = config.auth
    if auth.api_keys_in_redis and not config.redis_url:
        raise SystemExit("interpgw serve: --api-keys-in-redis needs --redis-url")
    redis_url = config.redis_url if auth.api_keys_in_redis else None
    configured = auth.api_keys_file is not None or redis_url is not None
    on = auth.mode == "on" or (auth.mode == "auto" and (configured or not _is_loopback(config.host)))
    if not on:
        if configured:
            log.warning("interpgw: --auth off: the configured API keys are ignored")
        return None
    if not configured:
        raise SystemExit(
            f"interpgw serve: authentication is on (--auth {auth.mode}, host {config.host}) but no API keys are "
            "configured: pass --api-keys FILE (see `interpgw keys create`) or --api-keys-in-redis, "
            "or --auth off to serve without authentication"
        )
    try:
        return open_key_store(auth.api_keys_file, redis_url, config.redis_prefix)
    except Exception as exc:  # noqa: BLE001 - a bad key file is a start-up error, said plainly
        raise SystemExit(f"interpgw serve: cannot read the API keys: {exc}") from None


async def _poll_hook_stats(
    engine: Any,
    metrics: Any,
    model_id: str,
    interval_s: float = 5.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Moves the worker's hook statistics into the metrics every few seconds (one small RPC to the worker) while
    the engine has work, and once more after it goes idle, for the last steps.

    Not while it is idle: after every call, vLLM's worker spins on its message queue for a second (`SpinCondition`,
    busy_loop_s=1), so polling an idle engine every 5 s cost a fifth of a core, taken from cache hits and whatever
    else the gateway serves meanwhile on a small machine.
    """
    polled_at = engine.requests_started  # requests started by the last poll that found none running, else -1
    while True:
        await sleep(interval_s)
        if engine.requests_running == 0 and engine.requests_started == polled_at:
            continue  # nothing ran since the last poll
        polled_at = engine.requests_started if engine.requests_running == 0 else -1
        try:
            stats = await engine.hook_stats()
            metrics.hook_stats(model_id, stats["seconds"], stats["steps"], stats["interventions"], stats["configs"])
        except Exception:  # noqa: BLE001 - metrics must never take the server down
            log.warning("reading hook statistics from the engine failed", exc_info=True)


def _trace_repository(config: ServerConfig, metrics: Any) -> Any:
    """The trace cache and stored traces: in Redis when configured, else in process memory."""
    from interpgw.cache.backends import RedisTraceCache, TieredTraceCache, open_trace_cache
    from interpgw.cache.traces import TraceRepository

    c = config.cache
    if c.max_bytes <= 0 and not config.redis_url:
        raise SystemExit(
            "interpgw serve: --cache-max-bytes must be positive without --redis-url (0 turns off only "
            "the in-process copy in front of Redis)"
        )
    cache = open_trace_cache(config.redis_url, config.redis_prefix, c.max_bytes, c.max_entry_bytes, c.ttl_s)
    # stored traces are read by handle, rarely twice in a row: no in-process copy of them beside Redis
    stored = open_trace_cache(
        config.redis_url, config.redis_prefix + "stored:", c.max_bytes, c.max_entry_bytes, c.stored_ttl_s, near=False
    )
    if metrics is not None:
        for store in (cache, stored):
            # a tiered cache's tiers are counted each under its own backend label; the cache as a whole is not
            for tier in (store.near, store.far) if isinstance(store, TieredTraceCache) else (store,):
                backend = "redis" if isinstance(tier, RedisTraceCache) else "memory"
                metrics.cache_up(backend, True)
                tier.stats.on_event = _cache_listener(metrics, backend)
    return TraceRepository(cache, stored)


def _cache_listener(metrics: Any, backend: str) -> Callable[[str, int], None]:
    on_event = metrics.cache_callback(backend)

    def listener(kind: str, nbytes: int) -> None:
        on_event(kind, nbytes)
        if kind in ("hit", "miss", "write", "error"):
            metrics.cache_up(backend, kind != "error")

    return listener


def _kill_descendants() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if keep_freed_memory(args.malloc_keep_mib * 2**20):
        log.info("malloc: keeping up to %d MiB of freed memory for reuse (--malloc-keep-mib)", args.malloc_keep_mib)
    asyncio.run(run(config_from_args(args), args.shutdown_grace))


if __name__ == "__main__":
    main()
