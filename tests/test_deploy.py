"""Deployment files (deploy/docker, deploy/compose.yaml, deploy/k8s), validated without a cluster or a Docker engine.

Kubernetes: every kustomization under deploy/k8s is rendered by `render` below, a small renderer of exactly the
kustomize features those files use (resources, namespace, labels without selectors, images, JSON 6902 patches with a
kind/name target); it refuses any other feature. Where `kubectl` is on PATH, `kubectl kustomize` must produce the same
objects with the same content (that comparison is the only conditional part: without kubectl the Python rendering is
still validated). Every rendered object is validated with kubernetes-validate (JSON schemas derived from the
Kubernetes OpenAPI, shipped in the package, offline) in strict mode (unknown fields fail) against Kubernetes 1.30, the
oldest version we support, and the newest version the installed package ships. The ServiceMonitor is a
prometheus-operator CRD, which those schemas do not contain: it is validated against SERVICE_MONITOR_SCHEMA, a minimal
strict schema of the fields we use written here, not against the operator's own CRD schema.

Compose: deploy/compose.yaml and its overrides in deploy/compose/ are validated with jsonschema against the official
compose-spec schema, vendored in tests/schemas/compose-spec.json from the PyPI package check-jsonschema (see
tests/schemas/README.md).

Docker: no Docker engine runs on these machines, so no image is built or run here. What can be checked is: the
Dockerfiles statically (non-root USER, HEALTHCHECK with `interpgw health`, COPY sources present and let into the
build context by .dockerignore), and the image's entrypoint script itself, which the `engine` test runs with this
repository's virtual environment on PATH against a tiny model, as the container would run it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway_process import free_port
from interpgw.metrics import METRIC_NAMES
from interpgw.serve import build_parser
from tiny_models import TINY_SERVER_ARGS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
COMPOSE_FILES = [DEPLOY / "compose.yaml", *sorted((DEPLOY / "compose").glob("*.yaml"))]
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"

KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
# what an operator deploys: the overlays and the examples (base and redis are parts of them)
OVERLAYS = sorted(p for p in KUSTOMIZATIONS if p.parent.name in ("overlays", "examples"))
# The oldest Kubernetes version the manifests support, and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())

GRPC_PORT = 50051
METRICS_PORT = 9464
# What the entrypoint adds in front of its arguments (deploy/docker/entrypoint.sh).
ENTRYPOINT_DEFAULTS = ["--host", "0.0.0.0", "--port", str(GRPC_PORT), "--metrics-host", "0.0.0.0"]
ENTRYPOINT_DEFAULTS += ["--metrics-port", str(METRICS_PORT)]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------ kustomize renderer

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` produces, for the subset of kustomize these manifests use.

    Order as kustomize applies its built-in transformers: resources (each sub-kustomization fully rendered first),
    then patches, namespace, labels, images.
    """
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["kind"] == "Kustomization", folder
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{rel(folder)} uses kustomize features this renderer does not implement: {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert not any(o["kind"] == "Namespace" for o in objects), "the namespace transformer is not modelled for them"
    for patch in spec.get("patches", []):
        assert set(patch) == {"target", "patch"} and set(patch["target"]) == {"kind", "name"}, patch
        operations = yaml.safe_load(patch["patch"])
        targets = [
            o
            for o in objects
            if o["kind"] == patch["target"]["kind"] and o["metadata"]["name"] == patch["target"]["name"]
        ]
        assert targets, f"{rel(folder)}: no object matches the patch target {patch['target']}"
        for target in targets:
            apply_json_patch(target, operations)
    if "namespace" in spec:
        for o in objects:
            o["metadata"]["namespace"] = spec["namespace"]
    for group in spec.get("labels", []):
        # only metadata.labels: includeSelectors / includeTemplates are not implemented (and not used)
        assert set(group) == {"pairs"}, group
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(group["pairs"])
    for image in spec.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, image
        for o in objects:
            for container in containers(o):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
    return objects


def split_image(image: str) -> tuple[str, str | None]:
    assert "@" not in image, "digests are not modelled"
    head, _, last = image.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
        return (f"{head}/{last}" if head else last), tag
    return image, None


def apply_json_patch(document: dict, operations: list[dict]) -> None:
    """RFC 6902 add / replace / remove / test (the operations the overlays use)."""
    for operation in operations:
        assert set(operation) <= {"op", "path", "value"}, operation
        parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        parent: Any = document
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        key: Any = last if isinstance(parent, dict) else (len(parent) if last == "-" else int(last))
        op = operation["op"]
        value = copy.deepcopy(operation.get("value"))
        if op == "add":
            if isinstance(parent, list):
                parent.insert(key, value)
            else:
                parent[key] = value
        elif op == "replace":
            assert key in parent if isinstance(parent, dict) else key < len(parent), operation
            parent[key] = value
        elif op == "remove":
            del parent[key]
        elif op == "test":
            assert parent[key] == value, f"JSON patch test failed: {operation} found {parent[key]!r}"
        else:
            raise AssertionError(f"JSON patch operation not implemented: {op}")


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]] if spec else []


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def gateway(objects: list[dict]) -> tuple[dict, dict]:
    """The gateway Deployment and its container."""
    (deployment,) = [o for o in by_kind(objects, "Deployment") if o["metadata"]["name"] == "interpgw"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return deployment, container


def key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


@pytest.fixture(scope="module")
def rendered() -> dict[Path, list[dict]]:
    return {folder: render(folder) for folder in KUSTOMIZATIONS}


def overlay_id(path: Path) -> str:
    return rel(path)


# ------------------------------------------------------------------------------------------ Kubernetes


def test_the_layout_has_a_base_redis_and_cpu_gpu_overlays() -> None:
    names = {rel(p) for p in KUSTOMIZATIONS}
    assert {"deploy/k8s/base", "deploy/k8s/redis", "deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu"} <= names


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=overlay_id)
def test_the_renderer_agrees_with_kubectl_kustomize(folder: Path, rendered: dict[Path, list[dict]]) -> None:
    # The only conditional check of this module: CI machines without kubectl still validate the Python rendering.
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH: the Python rendering alone is validated")
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = {key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {key(o): o for o in rendered[folder]}
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        assert ours[k] == theirs[k], k


# A minimal strict schema of the prometheus-operator ServiceMonitor fields these manifests use (the CRD is not in the
# Kubernetes schemas); unknown fields fail, as in the strict Kubernetes schemas.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port", "path", "interval"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=overlay_id)
def test_every_object_validates_against_the_kubernetes_schemas(
    folder: Path, version: str, rendered: dict[Path, list[dict]]
) -> None:
    for obj in rendered[folder]:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{rel(folder)} {key(obj)} against {version}: {path}: {exc.message}") from None
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"{rel(folder)} {key(obj)}: {exc.message}") from None


def test_the_strict_validation_rejects_an_unknown_field(rendered: dict[Path, list[dict]]) -> None:
    deployment, _ = gateway(rendered[K8S / "overlays" / "cpu"])
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["tls"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)
    monitor = copy.deepcopy(by_kind(rendered[K8S / "base"], "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(monitor)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=overlay_id)
def test_pods_run_as_non_root_without_service_links_or_api_tokens(
    folder: Path, rendered: dict[Path, list[dict]]
) -> None:
    for obj in rendered[folder]:
        spec = pod_spec(obj)
        if spec is None:
            continue
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, key(obj)
        assert spec["enableServiceLinks"] is False, key(obj)
        assert spec["automountServiceAccountToken"] is False, key(obj)
        for container in containers(obj):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (key(obj), container["name"])
            assert security["readOnlyRootFilesystem"] is True, (key(obj), container["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (key(obj), container["name"])
            assert security.get("runAsUser", context["runAsUser"]) != 0


def serve_args(container: dict) -> list[str]:
    """The command line `interpgw serve` gets in the container: the entrypoint's defaults, then the args."""
    assert "command" not in container, "the image's entrypoint must stay in charge"
    return [*ENTRYPOINT_DEFAULTS, *container.get("args", [])]


@pytest.mark.parametrize("folder", OVERLAYS, ids=overlay_id)
def test_gateway_probes_ask_the_grpc_health_service_on_the_grpc_port(
    folder: Path, rendered: dict[Path, list[dict]]
) -> None:
    _, container = gateway(rendered[folder])
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    args = build_parser().parse_args(serve_args(container))
    assert args.port == port == GRPC_PORT
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[name]
        if args.tls_cert is None:
            # kubelet's native gRPC probe (plaintext: it cannot reach a TLS port)
            assert probe["grpc"] == {"port": port}, (name, probe)
        else:
            # TLS on the gRPC port: the same health check through the CLI, trusting the server's CA
            command = probe["exec"]["command"]
            assert command[:2] == ["interpgw", "health"], (name, command)
            assert command[command.index("--address") + 1] == f"localhost:{port}"
            assert "--tls-ca" in command
    assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] > (
        args.shutdown_grace
    ), "a draining gateway (health NOT_SERVING) must not be killed by the liveness probe before it has drained"


@pytest.mark.parametrize("folder", OVERLAYS, ids=overlay_id)
def test_gateway_flags_are_real_serve_flags_and_fit_the_pod(folder: Path, rendered: dict[Path, list[dict]]) -> None:
    deployment, container = gateway(rendered[folder])
    args = build_parser().parse_args(serve_args(container))  # exits (SystemExit) on an unknown flag
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    # API keys from the mounted Secret (the gateway listens beyond loopback: authentication is on)
    assert args.auth != "off"
    keys_volume = volumes[mounts[str(Path(args.api_keys).parent)]]
    assert keys_volume["secret"]["secretName"] == "interpgw-api-keys"
    for path in filter(None, (args.tls_cert, args.tls_key)):
        assert volumes[mounts[str(Path(path).parent)]]["secret"]["secretName"] == "interpgw-tls"
    assert mounts["/cache"] and mounts["/dev/shm"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= args.shutdown_grace + 20, "SIGTERM drains for --shutdown-grace; kubelet must wait longer"
    gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    if "gpu" in folder.name:
        assert gpus == args.tensor_parallel_size * args.pipeline_parallel_size
        assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
    else:
        assert gpus == 0


SECRET_NAMES = {"interpgw-api-keys", "interpgw-tls", "interpgw-hf-token", "interpgw-redis-url"}


def secret_references(obj: dict) -> set[str]:
    names = set()
    spec = pod_spec(obj)
    for volume in (spec or {}).get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
    for container in containers(obj):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=overlay_id)
def test_secrets_are_referenced_never_inlined(folder: Path, rendered: dict[Path, list[dict]]) -> None:
    objects = rendered[folder]
    assert not by_kind(objects, "Secret"), "Secrets are created by the operator (docs/deploy.md), not shipped"
    referenced = set().union(*(secret_references(o) for o in objects))
    assert referenced <= SECRET_NAMES
    text = yaml.safe_dump_all(objects)
    assert "igw_" not in text, "an API key in a manifest"
    assert not re.search(r"://[^/\s@]*:[^/\s@]+@", text), "a URL with a password in a manifest"
    if folder in OVERLAYS:
        assert "interpgw-api-keys" in referenced
    if folder.name == "gpu-tls":
        assert "interpgw-tls" in referenced


@pytest.mark.parametrize("folder", OVERLAYS, ids=overlay_id)
def test_selectors_and_named_ports_match_the_pods(folder: Path, rendered: dict[Path, list[dict]]) -> None:
    objects = rendered[folder]
    pods = [(o["spec"]["template"]["metadata"]["labels"], o) for o in objects if pod_spec(o)]

    def selected(selector: dict[str, str]) -> list[dict]:
        return [o for labels, o in pods if selector.items() <= labels.items()]

    for workload in (o for _, o in pods):
        assert workload["spec"]["selector"]["matchLabels"].items() <= (
            workload["spec"]["template"]["metadata"]["labels"].items()
        )
    for service in by_kind(objects, "Service"):
        (target,) = selected(service["spec"]["selector"])
        port_names = {p["name"] for c in containers(target) for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names, service["metadata"]["name"]
    deployment, _ = gateway(objects)
    for budget in by_kind(objects, "PodDisruptionBudget"):
        assert selected(budget["spec"]["selector"]["matchLabels"]) == [deployment]
    for policy in by_kind(objects, "NetworkPolicy"):
        assert len(selected(policy["spec"]["podSelector"]["matchLabels"])) == 1
    (monitor,) = by_kind(objects, "ServiceMonitor")
    services = [
        s
        for s in by_kind(objects, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1, "one Service per pod scraped, or every sample would be scraped twice"
    (service,) = services
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert endpoint_ports <= {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["clusterIP"] == "None"
    # the alert rules match job="interpgw": the job label comes from the Service's label named by jobLabel
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "interpgw"
    # both Services speak gRPC on the gateway's port
    for s in by_kind(objects, "Service"):
        if s["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]:
            grpc = [p for p in s["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc and grpc[0]["port"] == GRPC_PORT and grpc[0]["appProtocol"] == "grpc"


def adapter_rules() -> dict[str, str]:
    """Prometheus adapter rules: exposed custom-metric name -> the Prometheus series it reads."""
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    rules = {}
    for rule in values["rules"]["custom"]:
        series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
        rules[rule["name"]["as"]] = series
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    return rules


@pytest.mark.parametrize("folder", OVERLAYS, ids=overlay_id)
def test_the_autoscaler_scales_the_gateway_on_a_gateway_metric(folder: Path, rendered: dict[Path, list[dict]]) -> None:
    objects = rendered[folder]
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    deployment, _ = gateway(objects)
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    rules = adapter_rules()
    assert set(rules.values()) <= METRIC_NAMES
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in METRIC_NAMES and name in rules, name


def service_link_names(service: dict) -> tuple[set[str], tuple[str, ...]]:
    """The variables kubelet's service links define for a Service: exact names and name prefixes."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        if "name" in port:
            names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        base = f"{prefix}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
        names |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
    return names, (f"{prefix}_SERVICE_", f"{prefix}_PORT_")


def image_env_names() -> set[str]:
    """Variables the images set (Dockerfile ENV) or the entrypoint reads."""
    names = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", ENTRYPOINT.read_text()))
    for dockerfile in DOCKERFILES:
        for instruction, value in dockerfile_instructions(dockerfile):
            if instruction == "ENV":
                names |= {token.split("=", 1)[0] for token in shlex.split(value)}
    return names


@pytest.mark.parametrize("folder", OVERLAYS, ids=overlay_id)
def test_no_variable_collides_with_a_service_link_name(folder: Path, rendered: dict[Path, list[dict]]) -> None:
    # enableServiceLinks is false (checked above); this also keeps the names safe where someone turns links back on.
    objects = rendered[folder]
    used = image_env_names() | {"INTERPGW_ADDRESS", "INTERPGW_API_KEY"}  # the SDK's and CLI's own variables
    for obj in objects:
        for container in containers(obj):
            used |= {env["name"] for env in container.get("env", [])}
    assert {"INTERPGW_REDIS_URL", "INTERPGW_CACHE_DIR"} <= used
    for service in by_kind(objects, "Service"):
        exact, prefixes = service_link_names(service)
        clashes = {n for n in used if n in exact or n.startswith(prefixes)}
        assert not clashes, f"Service {service['metadata']['name']} would overwrite {clashes}"


def test_service_link_names_are_computed_like_kubelet() -> None:
    service = {"metadata": {"name": "interpgw-redis"}, "spec": {"ports": [{"name": "redis", "port": 6379}]}}
    exact, prefixes = service_link_names(service)
    assert {"INTERPGW_REDIS_SERVICE_HOST", "INTERPGW_REDIS_PORT", "INTERPGW_REDIS_PORT_6379_TCP_ADDR"} <= exact
    assert "INTERPGW_REDIS_SERVICE_PORT_REDIS" in exact and prefixes == (
        "INTERPGW_REDIS_SERVICE_",
        "INTERPGW_REDIS_PORT_",
    )


def test_the_k8s_readme_documents_every_knob(rendered: dict[Path, list[dict]]) -> None:
    readme = (K8S / "README.md").read_text()
    knobs: set[str] = {"enableServiceLinks", "interpgw.io/client", "kubernetes.io/metadata.name: monitoring"}
    for folder in OVERLAYS:
        knobs.add(rel(folder))
        objects = rendered[folder]
        _, container = gateway(objects)
        knobs |= {arg.split("=", 1)[0] for arg in container["args"]}
        for obj in objects:
            knobs |= secret_references(obj)
            knobs.add(f"{obj['kind']} {obj['metadata']['name']}")
            for c in containers(obj):
                knobs |= {env["name"] for env in c.get("env", [])}
        knobs |= {
            m["pods"]["metric"]["name"] for m in by_kind(objects, "HorizontalPodAutoscaler")[0]["spec"]["metrics"]
        }
    missing = sorted(k for k in knobs if k not in readme)
    assert not missing, f"deploy/k8s/README.md does not mention {missing}"


# ------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_compose_files_match_the_compose_spec(path: Path, compose_validator: jsonschema.Validator) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator.iter_errors(load(path))]
    assert not errors, errors


def test_the_compose_schema_is_strict(compose_validator: jsonschema.Validator) -> None:
    compose = load(DEPLOY / "compose.yaml")
    compose["services"]["gateway"]["healthcheck"]["tset"] = ["CMD", "true"]
    assert list(compose_validator.iter_errors(compose))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a compose service's volumes (short syntax)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_the_compose_stack_wires_gateway_redis_prometheus_and_grafana() -> None:
    compose = load(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"gateway", "redis", "prometheus", "grafana"}
    gw = services["gateway"]
    assert gw["build"] == {"context": "..", "dockerfile": "deploy/docker/Dockerfile.cpu"}
    assert (DEPLOY / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
    assert gw["healthcheck"]["test"][:3] == ["CMD", "interpgw", "health"]
    assert gw["environment"]["INTERPGW_REDIS_URL"].startswith("redis://redis:")
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gw["restart"] in ("always", "unless-stopped", "on-failure"), "exit 3 (engine died) must restart it"
    args = build_parser().parse_args([*ENTRYPOINT_DEFAULTS, *gw["command"]])
    assert args.auth == "off", "compose.yaml is the local stack; keys come with compose/keys.yaml"
    grace = gw["stop_grace_period"]
    assert int(grace.rstrip("s")) > args.shutdown_grace
    assert mounts(gw)["/cache"] == "model-cache" and "model-cache" in compose["volumes"]
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port}: without authentication, publish on loopback only"
    # every bind mount exists, relative to deploy/ (the compose file's folder)
    for service in services.values():
        for source in mounts(service).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source


def test_compose_prometheus_scrapes_the_gateway_and_loads_the_alert_rules() -> None:
    services = load(DEPLOY / "compose.yaml")["services"]
    prometheus = mounts(services["prometheus"])
    config_path = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config = load(DEPLOY / prometheus[config_path])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == load(DEPLOY / "prometheus/prometheus.yml")["scrape_configs"][0]["job_name"] == "interpgw"
    assert job["static_configs"][0]["targets"] == [f"gateway:{METRICS_PORT}"]
    assert str(METRICS_PORT) in services["gateway"]["expose"]
    (rules,) = config["rule_files"]
    assert (DEPLOY / prometheus[rules]).resolve() == (DEPLOY / "prometheus/alerts.yml").resolve()


def test_compose_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = load(DEPLOY / "compose.yaml")["services"]["grafana"]
    volumes = mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert volumes["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert volumes["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"
    (source,) = load(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    (provider,) = load(provisioning / "dashboards" / "interpgw.yaml")["providers"]
    dashboards = {t: s for t, s in volumes.items() if t.startswith(provider["options"]["path"] + "/")}
    assert list(dashboards.values()) == ["./grafana/interpgw-dashboard.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


def test_compose_overrides_keep_the_gateway_consistent() -> None:
    keys = load(DEPLOY / "compose" / "keys.yaml")["services"]["gateway"]
    args = build_parser().parse_args([*ENTRYPOINT_DEFAULTS, *keys["command"]])
    assert args.auth == "auto" and args.api_keys
    assert str(Path(args.api_keys).parent) in mounts(keys)
    gpu = load(DEPLOY / "compose" / "gpu.yaml")["services"]["gateway"]
    args = build_parser().parse_args([*ENTRYPOINT_DEFAULTS, *gpu["command"]])
    assert args.dtype == "bfloat16" and args.tensor_parallel_size >= 1
    assert gpu["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


# ------------------------------------------------------------------------------------------ Dockerfiles


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    logical = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        instruction, _, rest = logical.partition(" ")
        yield instruction.upper(), rest.strip()
        logical = ""


def final_stage(path: Path) -> list[tuple[str, str]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, rest in dockerfile_instructions(path):
        if instruction == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((instruction, rest))
    return stages[-1]


def test_there_is_a_cpu_and_a_gpu_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_as_non_root_with_a_grpc_health_check(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    users = [rest for instruction, rest in stage if instruction == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    (healthcheck,) = [rest for instruction, rest in stage if instruction == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["interpgw", "health"]
    assert command[command.index("--address") + 1] == f"localhost:{GRPC_PORT}"
    (entrypoint,) = [json.loads(rest) for instruction, rest in stage if instruction == "ENTRYPOINT"]
    assert entrypoint[-1] == "/usr/local/bin/interpgw-entrypoint" and entrypoint[0] == "/usr/bin/tini"
    env = {}
    for instruction, rest in stage:
        if instruction == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    assert env["INTERPGW_CACHE_DIR"] == "/cache"
    assert env["HF_HOME"].startswith("/cache/") and env["VLLM_CACHE_ROOT"].startswith("/cache/")
    assert ("VOLUME", '["/cache"]') in stage
    exposed = {int(p) for instruction, rest in stage if instruction == "EXPOSE" for p in rest.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}


def copy_sources(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context (not --from another stage)."""
    out = []
    for instruction, rest in dockerfile_instructions(dockerfile):
        if instruction != "COPY":
            continue
        tokens = shlex.split(rest)
        flags = [t for t in tokens if t.startswith("--")]
        paths = [t for t in tokens if not t.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        out += [(source, paths[-1]) for source in paths[:-1]]
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    assert patterns[0] == "*", ".dockerignore is an allow-list: everything out, then what the images need back in"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = copy_sources(dockerfile)
    assert ("deploy/docker/entrypoint.sh", "/usr/local/bin/interpgw-entrypoint") in sources
    for source, _ in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is not let into the build context by .dockerignore"
    # what the install steps need: the server's pyproject (readme included) and the SDK's proto files
    assert {"pyproject.toml", "README.md", "proto", "client", "server"} <= {s for s, _ in sources}


def test_the_entrypoint_is_valid_bash() -> None:
    out = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def run_entrypoint(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The entrypoint with a stand-in `interpgw` on PATH that prints the arguments it got, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "interpgw"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" interpgw "$@"\n')
    fake.chmod(0o755)
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
    out = subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30, env=environment)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_entrypoint_builds_the_serve_command_line(tmp_path: Path) -> None:
    serve = ["interpgw", "serve", *ENTRYPOINT_DEFAULTS]
    assert run_entrypoint(tmp_path) == serve
    assert run_entrypoint(tmp_path, "--auth", "off") == [*serve, "--auth", "off"]
    assert run_entrypoint(tmp_path, "serve", "--port", "6000") == [*serve, "--port", "6000"]
    url = "redis://:secret@redis:6379/0"
    assert run_entrypoint(tmp_path, "--auth=off", env={"INTERPGW_REDIS_URL": url}) == [
        *serve,
        "--redis-url",
        url,
        "--auth=off",
    ]
    # another command runs instead of the gateway (operators: `interpgw keys create ...` in the image)
    assert run_entrypoint(tmp_path, "interpgw", "keys", "list", "--file", "k.yaml") == [
        "interpgw",
        "keys",
        "list",
        "--file",
        "k.yaml",
    ]
    # a flag given to the container wins over the entrypoint's default: argparse keeps the last value
    args = build_parser().parse_args(run_entrypoint(tmp_path, "--host", "127.0.0.1", "--port", "6000")[2:])
    assert (args.host, args.port, args.metrics_host, args.metrics_port) == ("127.0.0.1", 6000, "0.0.0.0", 9464)


# ------------------------------------------------------------------------------------------ docs


@pytest.mark.parametrize(
    "doc",
    ["docs/deploy.md", "deploy/k8s/README.md", "deploy/docker/README.md"],
)
def test_docs_name_only_files_that_exist(doc: str) -> None:
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:deploy|docs|scripts|tests)/[\w./-]*[\w])", text))
    missing = sorted(p for p in named if not (ROOT / p).exists() and "*" not in p)
    assert not missing, f"{doc} names missing files: {missing}"


# ------------------------------------------------------------------------------------------ the entrypoint, running


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_the_image_entrypoint_serves_a_model_and_drains_on_sigterm(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """deploy/docker/entrypoint.sh, run as the container runs it, with this repository's venv as the image's.

    It listens on 127.0.0.1 here (a flag after the entrypoint's --host 0.0.0.0, which the last-wins rule lets
    override), so the test server is never reachable beyond this machine; authentication is on with a key file
    made by `interpgw keys create`, like the mounted Secret of the Kubernetes manifests.
    """
    from interpgw_client import Client

    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "INTERPGW_CACHE_DIR": str(tmp_path / "cache"),  # what the images set to their /cache volume
    }
    keys = tmp_path / "keys" / "keys.yaml"  # a folder, as the Secret is mounted
    keys.parent.mkdir()
    created = subprocess.run(
        ["interpgw", "keys", "create", "--tenant", "deploy-test", "--roles", "read", "--file", str(keys)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.splitlines()[0].strip()
    assert api_key.startswith("igw_")

    port = free_port()
    address = f"127.0.0.1:{port}"
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [
            "bash",
            str(ENTRYPOINT),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--auth",
            "on",
            "--api-keys",
            str(keys),
            "--model",
            str(tiny_llama_dir),
            *TINY_SERVER_ARGS,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        health = ["interpgw", "health", "--address", address, "--timeout", "5"]
        deadline = time.monotonic() + 400
        while True:
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()[-4000:]
            checked = subprocess.run(health, capture_output=True, text=True, timeout=60, env=env)
            if checked.returncode == 0:
                break
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()[-4000:]
            time.sleep(2)
        assert checked.stdout.strip() == "SERVING"
        # exec: the gateway replaced the entrypoint's shell, so the container's SIGTERM reaches it directly
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and not any(part.endswith(b"entrypoint.sh") for part in cmdline), cmdline

        with Client(address, api_key=api_key, timeout=120) as client:
            result = client.generate("Hello there", max_tokens=4, temperature=0, ignore_eos=True)
            assert len(result.token_ids) == 4 and result.finish_reason == "length"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, (tmp_path / "gateway.log").read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # vLLM's engine processes, if anything was left
        except ProcessLookupError:
            pass
        if process.poll() is None:
            process.wait(10)
        log.close()
