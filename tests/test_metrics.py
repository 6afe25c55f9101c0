"""Prometheus metrics: recording and rendering, the instrumented RPC decorators, /metrics, and the deploy files.

Fast and without vLLM: RPCs run through a real grpc.aio server on a loopback port with a fake servicer.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from interpgw.config import LimitsConfig
from interpgw.core.errors import Internal, InvalidArgument
from interpgw.core.requests import Captured
from interpgw.engine.base import ModelFacts
from interpgw.engine.stat_logger import forward_scheduler_stats
from interpgw.limits import QuotaBook
from interpgw.metrics import METRIC_NAMES, GatewayMetrics
from interpgw.transport.chunks import encoded_tensor_messages
from interpgw.transport.errors import streaming, unary
from interpgw.transport.guard import CallGuard
from interpgw.transport.server import GatewayServer, gateway_handler
from interpgw.v1 import gateway_pb2 as pb
from interpgw.v1 import gateway_pb2_grpc as pb_grpc

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MODEL = "fake-model"

Key = tuple[str, frozenset[tuple[str, str]]]


def samples(metrics: GatewayMetrics) -> dict[Key, float]:
    """Every sample of the rendered exposition, keyed by sample name and labels."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


def series_names(metrics: GatewayMetrics) -> set[str]:
    """The series names PromQL can use: counters with `_total`, histograms' `_bucket`/`_sum`/`_count`."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


# ---------------------------------------------------------------------- GatewayMetrics


def test_every_family_is_listed_in_metric_names_and_prefixed() -> None:
    families = {
        f.name + ("_total" if f.type == "counter" else ""): f.type
        for f in text_string_to_metric_families(GatewayMetrics().render().decode())
    }
    assert set(families) == METRIC_NAMES
    assert all(name.startswith("interpgw_") for name in METRIC_NAMES)
    histograms = {n for n, t in families.items() if t == "histogram"}
    assert histograms == {
        "interpgw_rpc_duration_seconds",
        "interpgw_time_to_first_token_seconds",
        "interpgw_generation_tokens_per_second",
        "interpgw_batch_interventions",
        "interpgw_batch_steering_configs",
        "interpgw_cache_entry_bytes",
    }


def test_two_instances_keep_separate_registries() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.registry_size(3)
    assert value(a, "interpgw_registry_vectors") == 3
    assert value(b, "interpgw_registry_vectors") == 0


def test_records_and_renders_rpc_and_generation_values() -> None:
    m = GatewayMetrics()
    start = m.rpc_started("Generate")
    assert value(m, "interpgw_rpc_in_flight", method="Generate") == 1
    m.rpc_finished("Generate", "OK", 0.3)
    m.rpc_finished("Trace", "INTERNAL", 2.0)  # a finish without a start only drives its gauge negative
    assert isinstance(start, float)
    m.queue_depth(MODEL, 4)
    m.first_token(MODEL, 0.2)
    m.tokens(MODEL, prompt=10, generated=20, seconds=4.0)
    m.tokens(MODEL, prompt=5, generated=0, seconds=1.0)  # no tokens: counted, no rate observed

    assert value(m, "interpgw_rpc_in_flight", method="Generate") == 0
    assert value(m, "interpgw_rpc_requests_total", method="Generate", code="OK") == 1
    assert value(m, "interpgw_rpc_requests_total", method="Trace", code="INTERNAL") == 1
    assert value(m, "interpgw_rpc_duration_seconds_count", method="Generate", code="OK") == 1
    assert value(m, "interpgw_rpc_duration_seconds_sum", method="Generate", code="OK") == pytest.approx(0.3)
    assert value(m, "interpgw_rpc_duration_seconds_bucket", method="Generate", code="OK", le="0.25") == 0
    assert value(m, "interpgw_rpc_duration_seconds_bucket", method="Generate", code="OK", le="0.5") == 1
    assert value(m, "interpgw_queue_depth", model=MODEL) == 4
    assert value(m, "interpgw_time_to_first_token_seconds_sum", model=MODEL) == pytest.approx(0.2)
    assert value(m, "interpgw_prompt_tokens_total", model=MODEL) == 15
    assert value(m, "interpgw_generated_tokens_total", model=MODEL) == 20
    assert value(m, "interpgw_generation_tokens_per_second_count", model=MODEL) == 1
    assert value(m, "interpgw_generation_tokens_per_second_sum", model=MODEL) == pytest.approx(5.0)


def test_records_interpretability_cache_and_engine_values() -> None:
    m = GatewayMetrics()
    m.captured(MODEL, 4096, 2)
    m.captured(MODEL, 1024, 0)
    m.hook_stats(MODEL, 0.5, 10, interventions_per_step=[0, 3, 3], configs_per_step=[1, 2])
    m.registry_size(7)
    on_event = m.cache_callback("redis")
    on_event("hit", 2048)
    on_event("miss", 0)
    on_event("write", 3 * 2**20)
    on_event("corrupt", 100)
    m.cache_event("redis", "error")
    m.cache_up("redis", False)
    m.cache_up("memory", True)
    m.engine_stats(MODEL, running=3, waiting=2, kv_usage=0.25)

    assert value(m, "interpgw_captured_bytes_total", model=MODEL) == 5120
    assert value(m, "interpgw_captured_tensors_total", model=MODEL) == 2
    assert value(m, "interpgw_hook_seconds_total", model=MODEL) == pytest.approx(0.5)
    assert value(m, "interpgw_forward_steps_total", model=MODEL) == 10
    assert value(m, "interpgw_batch_interventions_count", model=MODEL) == 3
    assert value(m, "interpgw_batch_interventions_sum", model=MODEL) == 6
    assert value(m, "interpgw_batch_interventions_bucket", model=MODEL, le="0.0") == 1
    assert value(m, "interpgw_batch_steering_configs_sum", model=MODEL) == 3
    assert value(m, "interpgw_registry_vectors") == 7
    for kind in ("hit", "miss", "write", "corrupt", "error"):
        assert value(m, "interpgw_cache_events_total", backend="redis", kind=kind) == 1
    assert value(m, "interpgw_cache_bytes_read_total", backend="redis") == 2048 + 100
    assert value(m, "interpgw_cache_bytes_written_total", backend="redis") == 3 * 2**20
    assert value(m, "interpgw_cache_entry_bytes_count", backend="redis") == 2  # the hit and the write
    assert value(m, "interpgw_cache_entry_bytes_bucket", backend="redis", le="4096.0") == 1
    assert value(m, "interpgw_cache_entry_bytes_bucket", backend="redis", le="5.36870912e+08") == 2  # 512 MiB
    assert value(m, "interpgw_cache_up", backend="redis") == 0
    assert value(m, "interpgw_cache_up", backend="memory") == 1
    assert value(m, "interpgw_engine_running_requests", model=MODEL) == 3
    assert value(m, "interpgw_engine_waiting_requests", model=MODEL) == 2
    assert value(m, "interpgw_engine_kv_cache_usage_ratio", model=MODEL) == 0.25


def test_unknown_cache_event_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown cache event kind"):
        GatewayMetrics().cache_event("redis", "hits")


def test_scheduler_stats_reach_the_callback_and_a_failing_callback_is_contained() -> None:
    m = GatewayMetrics()
    stats = SimpleNamespace(num_running_reqs=5, num_waiting_reqs=2, num_skipped_waiting_reqs=1, kv_cache_usage=0.5)
    forward_scheduler_stats(lambda r, w, kv: m.engine_stats(MODEL, r, w, kv), stats)
    forward_scheduler_stats(lambda r, w, kv: m.engine_stats(MODEL, r, w, kv), None)  # steps without stats
    assert value(m, "interpgw_engine_running_requests", model=MODEL) == 5
    assert value(m, "interpgw_engine_waiting_requests", model=MODEL) == 3
    assert value(m, "interpgw_engine_kv_cache_usage_ratio", model=MODEL) == 0.5

    def broken(running: int, waiting: int, kv_usage: float) -> None:
        raise RuntimeError("boom")

    forward_scheduler_stats(broken, stats)  # logged, never raised into vLLM's output handler


# ---------------------------------------------------------------------- /metrics over HTTP


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def test_http_endpoint_serves_metrics_and_healthz_on_a_free_port() -> None:
    m = GatewayMetrics()
    m.registry_size(2)
    port = m.start_http_server("127.0.0.1", 0)
    try:
        assert port > 0
        status, content_type, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert "interpgw_registry_vectors 2.0" in body.decode()
        assert _get(f"http://127.0.0.1:{port}/healthz")[:1] == (200,)
        assert _get(f"http://127.0.0.1:{port}/elsewhere")[0] == 404
        with pytest.raises(RuntimeError):
            m.start_http_server("127.0.0.1", 0)
    finally:
        m.stop_http_server()


def test_serve_flags_fill_the_metrics_config() -> None:
    from interpgw.serve import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args([]))
    assert (default.metrics_host, default.metrics_port) == ("127.0.0.1", 9464)
    off = config_from_args(build_parser().parse_args(["--metrics-port", "-1", "--metrics-host", "0.0.0.0"]))
    assert (off.metrics_host, off.metrics_port) == ("0.0.0.0", -1)


# ---------------------------------------------------------------------- instrumented RPCs


class FakeService:
    """Knows one model; any other id is an invalid argument, as in `GatewayService.model`."""

    facts = ModelFacts(MODEL, "FakeForCausalLM", 2, 4, 100, "float32", 32, "memory")
    limits = LimitsConfig()
    quotas = QuotaBook()

    def model(self, model_id: str = "") -> SimpleNamespace:
        if model_id not in ("", MODEL):
            raise InvalidArgument(f"unknown model {model_id!r}")
        return SimpleNamespace(facts=self.facts)

    def list_models(self) -> list[ModelFacts]:
        return [self.facts]

    def hook_points(self, model_id: str = "") -> list[str]:
        return ["hook_embed"]


class FakeServicer(pb_grpc.GatewayServicer):
    def __init__(self, metrics: GatewayMetrics | None) -> None:
        self.service = FakeService()
        self.metrics = metrics
        self.hold = asyncio.Event()  # never set: RPCs that wait on it end only when the client goes away
        self.closed = asyncio.Event()  # set when the "flood" stream's generator is closed
        self.guard = CallGuard(LimitsConfig())  # what every real call passes: the caller as a context variable

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=MODEL)])

    @unary
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        return pb.ModelInfo(id=self.service.model(request.model).facts.id)  # InvalidArgument for other ids

    @unary
    async def ListVectors(self, request: pb.ListVectorsRequest, context: grpc.aio.ServicerContext):
        await self.hold.wait()
        return pb.ListVectorsResponse()

    @unary
    async def DeleteVector(self, request: pb.DeleteVectorRequest, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "a handler's own abort keeps its code")

    @streaming
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if request.model == "hang":
            yield pb.GenerateResponse(token=pb.TokenEvent(index=0, token_ids=[7], text="a"))
            await self.hold.wait()
        if request.model == "flood":  # 1 MiB messages without end: gRPC's flow control soon blocks the writes
            try:
                while True:
                    yield pb.GenerateResponse(tensor=pb.TensorChunk(hook="hook_embed", data=bytes(2**20)))
            finally:
                self.closed.set()
        self.service.model(request.model)
        yield pb.GenerateResponse(token=pb.TokenEvent(index=0, token_ids=[4], text="a"))
        yield pb.GenerateResponse(token=pb.TokenEvent(index=1, token_ids=[5], text="b"))
        captured = Captured(positions=[0, 1, 2], tensors={"hook_embed": torch.ones(3, 1)})
        for chunk in encoded_tensor_messages(pb.GenerateResponse, 0, captured, chunk_bytes=8):
            yield chunk  # one tensor of 12 bytes in two chunks, as the gateway sends them
        done = pb.GenerateDone(finish_reason="length", prompt_token_ids=[1, 2, 3], output_token_ids=[4, 5])
        yield pb.GenerateResponse(done=done)

    @streaming
    async def Trace(
        self, request: pb.TraceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TraceResponse]:
        yield pb.TraceResponse(prompt=pb.TracePromptResult(prompt_index=0))
        raise Internal("the engine fell over")


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the metric"
        await asyncio.sleep(0.02)


async def _serve(servicer: FakeServicer) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((gateway_handler(servicer),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_decorators_count_ok_errors_and_cancellations_with_their_codes() -> None:
    m = GatewayMetrics()

    async def main() -> None:
        server, port = await _serve(FakeServicer(m))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GatewayStub(channel)
                assert (await stub.ListModels(pb.ListModelsRequest())).models[0].id == MODEL
                await stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL))
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.DeleteVector(pb.DeleteVectorRequest(id="v"))
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED

                events = [r.WhichOneof("event") async for r in stub.Generate(pb.GenerateRequest())]
                assert events == ["token", "token", "tensor", "tensor", "done"]

                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in stub.Generate(pb.GenerateRequest(model="nope")):
                        pass
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in stub.Trace(pb.TraceRequest()):
                        pass
                assert error.value.code() == grpc.StatusCode.INTERNAL

                # the client goes away mid-stream: CANCELLED
                call = stub.Generate(pb.GenerateRequest(model="hang"))
                assert (await call.read()).WhichOneof("event") == "token"
                call.cancel()
                await _until(lambda: value(m, "interpgw_rpc_requests_total", method="Generate", code="CANCELLED") == 1)

                # the client's deadline passes while a unary call waits: DEADLINE_EXCEEDED
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.ListVectors(pb.ListVectorsRequest(), timeout=0.2)
                assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await _until(lambda: value(m, "interpgw_rpc_in_flight", method="ListVectors") == 0)
        finally:
            await server.stop(None)

    asyncio.run(main())

    def count(method: str, code: str) -> float:
        return value(m, "interpgw_rpc_requests_total", method=method, code=code)

    assert count("ListModels", "OK") == 1
    assert count("GetModelInfo", "OK") == 1
    assert count("GetModelInfo", "INVALID_ARGUMENT") == 1
    assert count("Generate", "OK") == 1
    assert count("Generate", "INVALID_ARGUMENT") == 1
    assert count("Generate", "CANCELLED") == 1
    assert count("Trace", "INTERNAL") == 1
    assert count("DeleteVector", "PERMISSION_DENIED") == 1
    assert count("ListVectors", "DEADLINE_EXCEEDED") == 1
    assert value(m, "interpgw_rpc_duration_seconds_count", method="Generate", code="OK") == 1
    for method in ("ListModels", "GetModelInfo", "Generate", "Trace", "ListVectors"):
        assert value(m, "interpgw_rpc_in_flight", method=method) == 0

    # model "" is the default model; the hanging stream's unknown id is labelled "", never with the client's text
    assert value(m, "interpgw_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(m, "interpgw_time_to_first_token_seconds_count", model="") == 1
    assert value(m, "interpgw_prompt_tokens_total", model=MODEL) == 3
    assert value(m, "interpgw_generated_tokens_total", model=MODEL) == 2
    assert value(m, "interpgw_generation_tokens_per_second_count", model=MODEL) == 1
    assert value(m, "interpgw_captured_bytes_total", model=MODEL) == 12
    assert value(m, "interpgw_captured_tensors_total", model=MODEL) == 1
    assert {dict(labels)["model"] for _, labels in samples(m) if "model" in dict(labels)} == {MODEL, ""}


def test_a_client_gone_during_a_blocked_write_ends_the_stream_cancelled_at_once() -> None:
    """The client cancels while the server waits for HTTP/2 flow control: the handler's generator is closed in the
    RPC's own task right away (not later by the garbage collector, in another task, which failed to reset the
    caller's context variable and counted the call as INTERNAL)."""
    m = GatewayMetrics()

    async def main() -> None:
        servicer = FakeServicer(m)
        server, port = await _serve(servicer)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.GatewayStub(channel).Generate(pb.GenerateRequest(model="flood"))
                assert (await call.read()).WhichOneof("event") == "tensor"
                await asyncio.sleep(0.3)  # the server fills the window and waits in a write
                call.cancel()
                await asyncio.wait_for(servicer.closed.wait(), timeout=5.0)
                await _until(lambda: value(m, "interpgw_rpc_in_flight", method="Generate") == 0)
        finally:
            await server.stop(None)

    asyncio.run(main())
    codes = {
        dict(labels)["code"]: v
        for (name, labels), v in samples(m).items()
        if name == "interpgw_rpc_requests_total" and dict(labels)["method"] == "Generate"
    }
    assert codes == {"CANCELLED": 1.0}


def test_decorators_work_without_metrics() -> None:
    async def main() -> None:
        server, port = await _serve(FakeServicer(None))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GatewayStub(channel)
                assert (await stub.ListModels(pb.ListModelsRequest())).models[0].id == MODEL
                assert len([r async for r in stub.Generate(pb.GenerateRequest())]) == 5
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_gateway_server_hands_its_metrics_to_the_real_servicer() -> None:
    m = GatewayMetrics()

    async def main() -> None:
        gateway = GatewayServer(FakeService(), "127.0.0.1", 0, 4 * 2**20, metrics=m)  # type: ignore[arg-type]
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                response = await pb_grpc.GatewayStub(channel).ListModels(pb.ListModelsRequest())
                assert [model.id for model in response.models] == [MODEL]
        finally:
            await gateway.stop(None)

    asyncio.run(main())
    assert value(m, "interpgw_rpc_requests_total", method="ListModels", code="OK") == 1


# ---------------------------------------------------------------------- deploy/ files

METRIC_IN_TEXT = re.compile(r"\binterpgw_[a-z0-9_]+")


@pytest.mark.parametrize("path", ["prometheus/alerts.yml", "grafana/interpgw-dashboard.json"])
def test_deploy_files_use_only_metrics_the_gateway_exports(path: str) -> None:
    used = set(METRIC_IN_TEXT.findall((DEPLOY / path).read_text()))
    assert used, f"no interpgw_ metric found in {path}"
    assert used <= series_names(GatewayMetrics()), sorted(used - series_names(GatewayMetrics()))


def test_alert_rules_and_prometheus_config_parse() -> None:
    import yaml  # PyYAML: a dev dependency (pyproject.toml)

    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"InterpgwDown", "InterpgwHighErrorRate", "InterpgwGenerateSlow", "InterpgwCacheErrors"} <= set(alerts)
    assert 'interpgw_cache_up{backend="redis"} == 0' in alerts["InterpgwRedisDown"]["expr"]
    assert alerts["InterpgwRedisDown"]["for"] == "1m"
    assert all(rule["expr"].strip() for rule in alerts.values())

    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["interpgw"]["metrics_path"] == "/metrics"
    assert "alerts.yml" in config["rule_files"]


def test_dashboard_is_valid_json_with_a_query_per_panel() -> None:
    dashboard = json.loads((DEPLOY / "grafana/interpgw-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)


def test_hook_stats_are_polled_while_the_engine_works_and_once_after() -> None:
    """An idle engine is not asked (each call makes vLLM's worker spin for a second); a busy one is, and once more
    after its last request, for the last steps."""
    from interpgw.serve import _poll_hook_stats

    class Engine:
        requests_started = 0
        requests_running = 0
        polls = 0

        async def hook_stats(self) -> dict:
            self.polls += 1
            return {"seconds": 0.5, "steps": 2, "interventions": [1, 1], "configs": [1, 1]}

    class Metrics:
        seconds = 0.0

        def hook_stats(self, model_id: str, seconds: float, steps: int, interventions: list, configs: list) -> None:
            assert model_id == "m" and steps == 2
            self.seconds += seconds

    async def scenario() -> list[int]:
        ticks: asyncio.Queue[None] = asyncio.Queue()
        done_ticks: asyncio.Queue[None] = asyncio.Queue()

        async def sleep(_: float) -> None:
            done_ticks.put_nowait(None)  # the previous interval's work is done
            await ticks.get()

        engine, metrics = Engine(), Metrics()
        poller = asyncio.ensure_future(_poll_hook_stats(engine, metrics, "m", sleep=sleep))
        await done_ticks.get()
        polls = []

        async def tick() -> None:
            ticks.put_nowait(None)
            await done_ticks.get()
            polls.append(engine.polls)

        for _ in range(3):
            await tick()  # idle: not asked
        engine.requests_started, engine.requests_running = 1, 1
        await tick()  # running: asked
        await tick()
        engine.requests_running = 0
        await tick()  # finished since the last poll: asked once more
        await tick()
        await tick()  # idle again: not asked
        engine.requests_started = 2  # a request that started and finished between two polls
        await tick()
        await tick()
        poller.cancel()
        assert metrics.seconds == 0.5 * engine.polls
        return polls

    assert asyncio.run(scenario()) == [0, 0, 0, 1, 2, 3, 3, 3, 4, 4]
