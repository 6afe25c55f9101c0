"""The gateway under cancellation, deadlines, shutdown and engine death, and over TLS, with real processes."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_process import GatewayProcess
from interpgw_client import AsyncClient, Client, DeadlineExceededError, UnauthenticatedError, UnavailableError
from tiny_models import TINY_SERVER_ARGS

pytestmark = pytest.mark.engine

PROMPT = "Once upon a time"


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def generate_codes(samples: dict) -> dict[str, float]:
    """Generate RPCs counted per final status code, for failure messages."""
    return {
        dict(labels)["code"]: value
        for (name, labels), value in samples.items()
        if name == "interpgw_rpc_requests_total" and dict(labels).get("method") == "Generate"
    }


def code_deltas(before: dict, after: dict) -> dict[str, float]:
    old, new = generate_codes(before), generate_codes(after)
    return {code: new[code] - old.get(code, 0.0) for code in new if new[code] != old.get(code, 0.0)}


def wait_idle(gateway: GatewayProcess, model: str, timeout: float = 20.0) -> dict:
    """Polls /metrics until vLLM runs nothing and no Generate RPC is in flight; returns the last scrape."""

    def busy(samples: dict) -> tuple[float, float, float]:
        return (
            sample(samples, "interpgw_engine_running_requests", model=model),
            sample(samples, "interpgw_engine_waiting_requests", model=model),
            sample(samples, "interpgw_rpc_in_flight", method="Generate"),
        )

    samples = gateway.scrape_until(lambda s: busy(s) == (0, 0, 0), timeout)
    running, waiting, in_flight = busy(samples)
    assert (running, waiting, in_flight) == (0, 0, 0), (
        f"still busy after {timeout}s: running {running}, waiting {waiting}, rpc {in_flight}"
    )
    return samples


# ---------------------------------------------------------------------- cancellation and deadlines


# These two run on the default model: its server must still be generating when the client's cancel (or deadline)
# arrives. On the tiny model a busy machine let the server finish 600 tokens per stream, queued in HTTP/2 windows,
# before the starved client had read 8 of them: those streams ended OK on the server, and nothing was cancelled.


def test_cancelled_streams_free_their_engine_slots_and_memory(default_gateway) -> None:
    """32 long streams cancelled mid-way: vLLM's running count returns to 0 at once and memory to its baseline."""

    async def cancelled_round(client: AsyncClient) -> list[int]:
        streams = [
            client.generate_stream(f"{PROMPT} {i}", max_tokens=600, temperature=0, ignore_eos=True) for i in range(32)
        ]

        async def run(stream) -> int:  # noqa: ANN001
            seen = 0
            async for event in stream:
                seen += len(event.token_ids)
                if seen >= 8:
                    stream.cancel()
                    break
            return seen

        return await asyncio.gather(*(run(s) for s in streams))

    async def scenario() -> None:
        async with AsyncClient(default_gateway.address, timeout=300) as client:
            model = (await client.model_info()).id
            # warm-up: the same round, so the baseline includes what a busy engine and a cancelled round allocate;
            # what a second round adds is then what cancellation fails to give back
            await cancelled_round(client)
            before = await asyncio.to_thread(wait_idle, default_gateway, model)
            baseline = default_gateway.rss_bytes()
            seen = await cancelled_round(client)
            assert all(8 <= n < 600 for n in seen)
            started = time.monotonic()
            after = await asyncio.to_thread(wait_idle, default_gateway, model)
            freed_in = time.monotonic() - started
            assert code_deltas(before, after) == {"CANCELLED": 32.0}
            assert freed_in < 10.0
            rss = default_gateway.rss_bytes()
            assert rss <= baseline * 1.05, f"RSS {rss / 2**20:.0f} MiB vs baseline {baseline / 2**20:.0f} MiB"
            # the slots are really free: a new request runs to the end
            result = await client.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
            assert len(result.token_ids) == 5

    asyncio.run(scenario())


def test_a_deadline_ends_the_stream_and_frees_its_slot(default_gateway) -> None:
    with Client(default_gateway.address, timeout=1.5) as hurried:
        model = hurried.model_info().id
        before = wait_idle(default_gateway, model)
        with pytest.raises(DeadlineExceededError):
            hurried.generate(PROMPT, max_tokens=1000, temperature=0, ignore_eos=True)
    after = wait_idle(default_gateway, model, timeout=10.0)
    assert code_deltas(before, after) == {"DEADLINE_EXCEEDED": 1.0}


# ---------------------------------------------------------------------- shutdown and engine failure


def test_sigterm_drains_in_flight_streams_then_exits(tiny_llama_dir: Path) -> None:
    gateway = GatewayProcess("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, "--shutdown-grace", "120")
    try:
        with Client(gateway.address, timeout=300) as client:
            stream = client.generate_stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
            events = iter(stream)
            first = next(events)
            gateway.process.send_signal(signal.SIGTERM)
            refused = False  # no new calls while draining, once the signal is handled
            deadline = time.monotonic() + 30
            while not refused and time.monotonic() < deadline:
                try:
                    client.models()
                    time.sleep(0.1)
                except UnavailableError:
                    refused = True
            assert refused, "new calls were still accepted 30 s after SIGTERM"
            rest = sum(len(e.token_ids) for e in events)
            assert len(first.token_ids) + rest == 400
            assert stream.result.finish_reason == "length"
        assert gateway.process.wait(60) == 0
        assert "shutting down" in gateway.log_tail(200)
    finally:
        gateway.stop()


def _engine_core(gateway: GatewayProcess):  # noqa: ANN202
    import psutil

    cores = [c for c in psutil.Process(gateway.process.pid).children() if "EngineCore" in c.name()]
    assert cores, "the gateway started no engine process"
    return cores[0]


def test_engine_death_turns_health_not_serving_fails_streams_clearly_and_exits(tiny_llama_dir: Path) -> None:
    gateway = GatewayProcess("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS)
    statuses: list[int] = []
    try:
        channel = grpc.insecure_channel(gateway.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

        def follow() -> None:
            try:
                for reply in watch:
                    statuses.append(reply.status)
            except grpc.RpcError:
                pass  # the server went away

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        with Client(gateway.address, timeout=120) as client:
            stream = client.generate_stream(PROMPT, max_tokens=1000, temperature=0, ignore_eos=True)
            events = iter(stream)
            next(events)
            _engine_core(gateway).kill()
            with pytest.raises(UnavailableError, match="engine"):
                for _ in events:
                    pass
        assert gateway.process.wait(60) == 3
        follower.join(10)
        channel.close()
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses[0] == serving and not_serving in statuses
        assert "died; health NOT_SERVING, exiting with status 3" in gateway.log_tail(200)
    finally:
        gateway.stop()


# ---------------------------------------------------------------------- TLS, mutual TLS and a key file


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, usage=None, san=None):  # noqa: ANN001, ANN202
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem: str, cert, key) -> None:  # noqa: ANN001
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("interpgw test CA", ca_key, name("interpgw test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    server = issue("localhost", server_key, ca.subject, ca_key, False, ExtendedKeyUsageOID.SERVER_AUTH, san)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("notebook", client_key, ca.subject, ca_key, False, ExtendedKeyUsageOID.CLIENT_AUTH)
    write("ca", ca, ca_key)
    write("server", server, server_key)
    write("client", client, client_key)
    return {stem: folder / f"{stem}.pem" for stem in ("ca", "server", "client")} | {
        f"{stem}_key": folder / f"{stem}.key" for stem in ("server", "client")
    }


def test_mutual_tls_with_an_api_key_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    files = _certificates(tmp_path)
    keys_file = tmp_path / "keys.yaml"
    created = subprocess.run(
        [sys.executable, "-m", "interpgw_client.cli", "keys", "create", "--tenant", "lab", "--roles", "read"]
        + ["--file", str(keys_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[0]
    assert secret not in keys_file.read_text()

    ca = files["ca"].read_bytes()
    mutual = grpc.ssl_channel_credentials(ca, files["client_key"].read_bytes(), files["client"].read_bytes())
    gateway = GatewayProcess(
        "--model",
        str(tiny_llama_dir),
        *TINY_SERVER_ARGS,
        "--tls-cert",
        str(files["server"]),
        "--tls-key",
        str(files["server_key"]),
        "--tls-client-ca",
        str(files["ca"]),
        "--api-keys",
        str(keys_file),
        credentials=mutual,
    )
    try:
        with Client(gateway.address, credentials=mutual, api_key=secret, timeout=120) as client:
            assert len(client.generate(PROMPT, max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
        with Client(gateway.address, credentials=mutual, timeout=60) as keyless:
            with pytest.raises(UnauthenticatedError):
                keyless.models()
        without_client_cert = grpc.ssl_channel_credentials(ca)
        with Client(gateway.address, credentials=without_client_cert, api_key=secret, timeout=20) as stranger:
            with pytest.raises(UnavailableError):
                stranger.models()
        with Client(gateway.address, api_key=secret, timeout=20) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.models()
    finally:
        gateway.stop()


# ---------------------------------------------------------------------- start-up refusals

UNKNOWN_HUB_MODEL = "nosuchorg/nosuchmodel"  # passes the quick checks; only loading it fails (after those checks)


def serve_until_exit(*args: str) -> subprocess.CompletedProcess:
    """`interpgw serve` that is expected to refuse to start. HF_HUB_OFFLINE: a hub lookup fails at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "interpgw.serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def taken_port():  # noqa: ANN201
    """A port another server listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_a_taken_grpc_port_ends_the_start_before_any_model_loads(taken_port: int) -> None:
    done = serve_until_exit("--model", UNKNOWN_HUB_MODEL, "--port", str(taken_port), "--metrics-port", "-1")
    assert done.returncode != 0
    # The model's load would have failed too: its error is absent because the port was checked first.
    assert done.stderr.strip().splitlines()[-1] == (
        f"interpgw serve: cannot serve gRPC: 127.0.0.1:{taken_port} is already in use (choose another --port)"
    )
    assert "cannot load" not in done.stderr and "Traceback" not in done.stderr


def test_a_taken_metrics_port_ends_the_start_before_any_model_loads(taken_port: int) -> None:
    done = serve_until_exit("--model", UNKNOWN_HUB_MODEL, "--port", "0", "--metrics-port", str(taken_port))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"interpgw serve: cannot serve /metrics: 127.0.0.1:{taken_port} is already in use "
        "(choose another --metrics-port, or -1)"
    )
    assert "cannot load" not in done.stderr and "Traceback" not in done.stderr


def test_a_model_that_is_neither_a_folder_nor_on_the_hub_is_named_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = serve_until_exit("--model", str(missing), "--port", "0", "--metrics-port", "-1")
    assert done.returncode != 0
    assert f"--model {missing}: no such folder" in done.stderr and "Traceback" not in done.stderr
    done = serve_until_exit("--model", str(tmp_path), "--port", "0", "--metrics-port", "-1")
    assert f"--model {tmp_path} is a folder without config.json" in done.stderr
    done = serve_until_exit("--model", UNKNOWN_HUB_MODEL, "--port", "0", "--metrics-port", "-1")
    assert done.returncode != 0
    assert f"cannot load --model '{UNKNOWN_HUB_MODEL}' from the hub or its cache" in done.stderr
    assert "Traceback" not in done.stderr
