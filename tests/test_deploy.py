"""The deploy files, offline: kustomize renders, Kubernetes' schemas accept, and they agree with the code."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = ["cpu-dev", "gpu"]
SERVICES = ("gateway", "denoiser", "interposer", "processor")
BIN = Path(sys.executable).parent
K8S_VERSION = "1.37.0"


def settings_of(service: str) -> dict[str, object]:
    """BATON_* env var -> default, for one service."""
    module = importlib.import_module(f"services.{service}.service")
    return {s.env: s.default for s in module.SETTINGS}


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.fail(f"{name} is not installed"))


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    result = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / request.param)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out.write_text(result.stdout)
    return out, [d for d in yaml.safe_load_all(result.stdout) if d]


def containers(docs: list[dict]):
    """(service, container) for each Baton container in the rendered Deployments."""
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c.get("args", [None])[0] == "serve":
                yield c["args"][1], c


def test_every_overlay_passes_strict_validation_against_a_current_kubernetes(rendered):
    path, docs = rendered
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_container_and_probe_ports_are_the_services_defaults(rendered):
    _, docs = rendered
    seen = set()
    for service, c in containers(docs):
        defaults = settings_of(service)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": defaults["BATON_PORT"], "metrics": defaults["BATON_METRICS_PORT"]}, service
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == defaults["BATON_PORT"], (service, probe)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env.get("BATON_PORT") == str(defaults["BATON_PORT"])
        seen.add(service)
    assert seen == set(SERVICES)


def test_every_baton_variable_in_the_manifests_is_a_real_setting(rendered):
    _, docs = rendered
    for service, c in containers(docs):
        known = settings_of(service)
        for e in c["env"]:
            if e["name"].startswith("BATON_"):
                assert e["name"] in known, f"{service}: {e['name']} is not a setting of the {service}"


def test_grace_periods_outlast_the_drain(rendered):
    _, docs = rendered
    for doc in docs:
        if doc["kind"] != "Deployment" or not any(True for _ in containers([doc])):
            continue
        spec = doc["spec"]["template"]["spec"]
        drain = float(next(e["value"] for e in spec["containers"][0]["env"] if e["name"] == "BATON_GRACE_PERIOD"))
        assert spec["terminationGracePeriodSeconds"] > drain + 5, doc["metadata"]["name"]


def test_the_gateways_worker_addresses_resolve_to_services(rendered):
    _, docs = rendered
    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]} for d in docs if d["kind"] == "Service"}
    gateway = next(c for s, c in containers(docs) if s == "gateway")
    env = {e["name"]: e.get("value", "") for e in gateway["env"]}
    addresses = [a for k in ("BATON_DENOISERS", "BATON_INTERPOSERS", "BATON_PROCESSORS") for a in env[k].split(",")]
    assert addresses
    for address in addresses:
        host, port = address.rsplit(":", 1)
        assert host in services and int(port) in services[host], address


def test_only_the_gateway_is_open_to_the_outside(rendered):
    _, docs = rendered
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    open_rules = [r for r in policies["baton-gateway"]["ingress"] if "from" not in r]
    assert [p["port"] for r in open_rules for p in r["ports"]] == [settings_of("gateway")["BATON_PORT"]]
    assert all("from" in r for r in policies["baton-workers"]["ingress"])


def test_the_gpu_overlay_gives_denoisers_gpus_and_autoscaling():
    result = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / "gpu")],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    denoisers = [c for s, c in containers(docs) if s == "denoiser"]
    assert len(denoisers) == 2 and all(c["resources"]["limits"]["nvidia.com/gpu"] == 1 for c in denoisers)
    assert {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"} == {
        "baton-denoiser", "baton-denoiser-flux"}  # fmt: skip


def test_the_compose_file_parses_and_names_the_same_settings():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        assert service["command"] == ["serve", name]
        known = settings_of(name)
        env = service["environment"]
        assert all(k in known for k in env if k.startswith("BATON_")), name
        assert int(env["BATON_PORT"]) == known["BATON_PORT"]
        assert ("ports" in service) == (name == "gateway"), "only the gateway publishes a port"
    assert compose["services"]["denoiser"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_the_dockerfile_lints_clean():
    result = subprocess.run([tool("hadolint"), str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
