"""The deployment files (docker-compose.yml, deploy/haproxy.cfg, deploy/kubernetes/) agree with the
code: health routes and port, grace periods longer than the drain, real setting names, labels that
select the pods, and a proxy that checks readiness and keeps WebSockets open."""

from __future__ import annotations

import inspect
import ipaddress
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.drain import drain_node
from app.settings import Settings
from web.limits import parse_networks

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "docker-compose.yml"
HAPROXY = ROOT / "deploy" / "haproxy.cfg"
PORT = 8080

# Environment names closeloop reads: every quoted upper-case name in app/settings.py.
SETTING_NAMES = frozenset(re.findall(r'"([A-Z][A-Z0-9_]+)"', (ROOT / "app" / "settings.py").read_text()))
ENV_NAME = re.compile(r"\b(?:CLOSELOOP_[A-Z0-9_]+|DATABASE_URL|PUBLIC_BASE_URL|TWILIO_[A-Z0-9_]+)\b")


def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((K8S / name).read_text())
    assert isinstance(data, dict), name
    return data


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _closeloop_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run closeloop (built from the repository's Dockerfile)."""
    services = {name: svc for name, svc in compose["services"].items() if "build" in svc}
    assert len(services) >= 2, "the fleet needs at least two closeloop nodes"
    return services


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _seconds(duration: str | int) -> float:
    """A compose duration ("60s", "1m30s", "90") in seconds."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", duration.strip())
    assert parts and duration.strip(), f"not a duration: {duration!r}"
    hours, minutes, seconds = (float(p) if p else 0.0 for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def _drain_default() -> float:
    return float(Settings.model_fields["drain_seconds"].default)


def _goodbye_seconds() -> float:
    """How long drain_node waits for the goodbyes once the drain time is over."""
    return float(inspect.signature(drain_node).parameters["goodbye_s"].default)


def _server_shutdown_seconds() -> float:
    """uvicorn's graceful shutdown after the drain (app/serve.py)."""
    found = re.search(r"timeout_graceful_shutdown=(\d+(?:\.\d+)?)", (ROOT / "app" / "serve.py").read_text())
    assert found, "app/serve.py no longer sets timeout_graceful_shutdown"
    return float(found.group(1))


def _http_route_paths(source: str) -> set[str]:
    return set(re.findall(r'@app\.get\(\s*"([^"]+)"', source))


# ---- the code's side --------------------------------------------------------------------------------


def test_routes_define_liveness_and_readiness() -> None:
    source = (ROOT / "app" / "routes.py").read_text()
    assert {"/healthz", "/readyz"} <= _http_route_paths(source)
    readyz = source[source.index('"/readyz"') :]
    assert "drain.draining" in readyz.split("@app.")[0], "/readyz must turn 503 while the node drains"


# ---- Kubernetes --------------------------------------------------------------------------------------


def test_k8s_probes_use_the_health_routes_on_the_server_port() -> None:
    container = _container(_load("deployment.yaml"))
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness, container.get("startupProbe")):
        if probe is not None:
            assert probe["httpGet"]["port"] == PORT
            assert probe["httpGet"]["path"] in _http_route_paths((ROOT / "app" / "routes.py").read_text())
    assert PORT in [p["containerPort"] for p in container["ports"]]
    # /healthz fails while the database is away: liveness must tolerate a short outage.
    assert liveness.get("failureThreshold", 3) * liveness.get("periodSeconds", 10) >= 60


def test_k8s_grace_period_outlasts_the_drain() -> None:
    config = _load("configmap.yaml")["data"]
    pod = _load("deployment.yaml")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in _container(_load("deployment.yaml")).get("env", [])}
    drain = float(
        env.get("CLOSELOOP_DRAIN_SECONDS") or config.get("CLOSELOOP_DRAIN_SECONDS", _drain_default())
    )
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain + _goodbye_seconds()
    assert grace >= drain + _goodbye_seconds() + _server_shutdown_seconds()


def test_k8s_env_names_are_real_settings() -> None:
    config = _load("configmap.yaml")
    secret = _load("secret.example.yaml")
    container = _container(_load("deployment.yaml"))
    names = set(config["data"]) | set(secret["stringData"]) | {e["name"] for e in container.get("env", [])}
    assert names, "no environment found"
    assert sorted(names - SETTING_NAMES) == []


def test_k8s_env_comes_from_the_configmap_and_the_secret() -> None:
    config, secret = _load("configmap.yaml"), _load("secret.example.yaml")
    container = _container(_load("deployment.yaml"))
    refs = [ref["configMapRef"]["name"] for ref in container["envFrom"] if "configMapRef" in ref]
    assert refs == [config["metadata"]["name"]]
    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert {"DATABASE_URL", "CLOSELOOP_SECRET_KEY", "TWILIO_AUTH_TOKEN"} <= set(from_secret)
    for name, ref in from_secret.items():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"], name
    # Secrets never sit in the ConfigMap.
    assert not {"DATABASE_URL", "CLOSELOOP_SECRET_KEY", "TWILIO_AUTH_TOKEN"} & set(config["data"])


def test_k8s_example_secret_holds_placeholders_and_is_skipped_by_the_documented_apply() -> None:
    secret = _load("secret.example.yaml")
    assert secret["metadata"]["labels"].get("closeloop-example") == "true"
    for key, value in secret["stringData"].items():
        assert "CHANGE-ME" in value, key
    for path in K8S.glob("*.yaml"):
        if path.name == "secret.example.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert "closeloop-example" not in doc["metadata"].get("labels", {}), path.name
    assert (
        "kubectl apply -f deploy/kubernetes/ -l 'closeloop-example!=true'"
        in (ROOT / "docs" / "deployment.md").read_text()
    )


def test_k8s_settings_parse() -> None:
    config = _load("configmap.yaml")["data"]
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings"
    assert parse_networks(config["CLOSELOOP_TRUSTED_PROXIES"])
    assert int(config["CLOSELOOP_PORT"]) == PORT
    assert config["CLOSELOOP_HOST"] == "0.0.0.0"
    assert len(_load("secret.example.yaml")["stringData"]["CLOSELOOP_SECRET_KEY"].encode()) >= 16


def test_k8s_selectors_match_the_pods() -> None:
    deployment = _load("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    pdb = _load("pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget"
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    assert pdb["spec"]["minAvailable"] == 1
    assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]
    service = _load("service.yaml")
    assert selects(service["spec"]["selector"])
    port_names = {p.get("name") for p in _container(deployment)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names | {PORT}


def test_k8s_pod_runs_as_non_root_without_service_links() -> None:
    pod = _load("deployment.yaml")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The image's user is a name (Dockerfile); the kubelet can only verify a numeric uid.
    assert pod["securityContext"]["runAsUser"] == 10001
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text()
    # A Service named closeloop would inject CLOSELOOP_PORT=tcp://..., which is not a port.
    assert pod["enableServiceLinks"] is False
    resources = _container(_load("deployment.yaml"))["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


def test_k8s_ingress_keeps_websockets_open_and_routes_to_the_service() -> None:
    service = _load("service.yaml")
    ingresses = list(yaml.safe_load_all((K8S / "ingress.yaml").read_text()))
    assert ingresses
    main = ingresses[0]
    annotations = main["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in service_ports


# ---- docker compose ----------------------------------------------------------------------------------


def test_compose_grace_period_outlasts_the_drain() -> None:
    for name, svc in _closeloop_services(_compose()).items():
        drain = float(svc["environment"].get("CLOSELOOP_DRAIN_SECONDS", _drain_default()))
        grace = _seconds(svc["stop_grace_period"])
        assert grace > drain + _goodbye_seconds(), name
        assert grace > drain + 20, name
        assert grace >= drain + _goodbye_seconds() + _server_shutdown_seconds(), name


def test_compose_env_names_are_real_settings() -> None:
    names: set[str] = set()
    for svc in _closeloop_services(_compose()).values():
        names |= set(svc["environment"])
    assert names
    assert sorted(names - SETTING_NAMES) == []


def test_compose_nodes_share_database_key_and_proxy() -> None:
    compose = _compose()
    nodes = _closeloop_services(compose)
    envs = [svc["environment"] for svc in nodes.values()]
    for key in ("DATABASE_URL", "CLOSELOOP_SECRET_KEY", "CLOSELOOP_TRUSTED_PROXIES", "PUBLIC_BASE_URL"):
        values = {env[key] for env in envs}
        assert len(values) == 1 and None not in values, key
    database = urlsplit(envs[0]["DATABASE_URL"])
    postgres = compose["services"][database.hostname]
    assert str(postgres["image"]).startswith("postgres:15")
    assert "healthcheck" in postgres
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "PostgreSQL needs a named volume"
    assert "${CLOSELOOP_SECRET_KEY" in envs[0]["CLOSELOOP_SECRET_KEY"]
    for env in envs:
        assert env["CLOSELOOP_HOST"] == "0.0.0.0"
    for svc in nodes.values():
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
    assert len({(svc["build"], svc.get("image")) for svc in nodes.values()}) == 1, "one image for all nodes"

    proxy = compose["services"]["haproxy"]
    assert str(proxy["image"]).startswith("haproxy:")
    assert "8080:8080" in proxy["ports"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
    proxy_addresses = [net["ipv4_address"] for net in proxy["networks"].values()]
    trusted = parse_networks(envs[0]["CLOSELOOP_TRUSTED_PROXIES"])
    assert proxy_addresses
    assert all(any(ipaddress.ip_address(a) in t for t in trusted) for a in proxy_addresses)


# ---- HAProxy -----------------------------------------------------------------------------------------


def _haproxy_lines() -> list[str]:
    return [line.split("#", 1)[0].strip() for line in HAPROXY.read_text().splitlines()]


def test_haproxy_checks_readiness_and_keeps_sockets_open() -> None:
    lines = [line for line in _haproxy_lines() if line]
    assert "option httpchk" in lines
    assert any(re.fullmatch(r"http-check send meth GET uri /readyz\b.*", line) for line in lines)
    assert "http-check expect status 200" in lines
    assert any(re.fullmatch(r"timeout tunnel \d+[hm]", line) for line in lines)
    assert "option forwardfor" in lines
    assert "balance roundrobin" in lines
    assert "http-request del-header X-Forwarded-For" in lines
    # Calls in progress on a node that drains must not be cut when it is marked down.
    assert not any("shutdown-sessions" in line for line in lines)
    # No stickiness: any node takes any request.
    assert not any(line.startswith(("cookie ", "stick ", "stick-table ")) for line in lines)


def test_haproxy_servers_are_the_compose_nodes() -> None:
    servers = [line.split() for line in _haproxy_lines() if line.startswith("server ")]
    defaults = {}
    for parts in servers:
        found = re.fullmatch(r'"\$\{[A-Z0-9_]+-([a-z0-9]+):(\d+)\}"', parts[2])
        assert found, parts
        defaults[found.group(1)] = int(found.group(2))
    assert defaults == {name: PORT for name in _closeloop_services(_compose())}
    assert "check" in next(line for line in _haproxy_lines() if line.startswith("default-server "))


# ---- every deploy file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [COMPOSE, HAPROXY, *sorted(K8S.glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_setting_names_mentioned_anywhere_exist(path: Path) -> None:
    mentioned = set(ENV_NAME.findall(path.read_text()))
    assert sorted(mentioned - SETTING_NAMES) == []
