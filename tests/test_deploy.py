"""The deploy files, offline: kustomize renders, Kubernetes' schemas accept, and they agree with the code."""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = ["cpu-dev", "gpu", "secure"]
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


@functools.cache
def kustomize(overlay: str) -> str:
    result = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(kustomize(overlay)) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    out.write_text(kustomize(request.param))
    return out, render(request.param)


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
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env.get("BATON_PORT") == str(defaults["BATON_PORT"])
        assert env.get("BATON_METRICS_PORT") == str(defaults["BATON_METRICS_PORT"])
        readiness = c["readinessProbe"]
        if env.get("BATON_TLS_CERT"):
            # kubelet's gRPC probe speaks plaintext only: over TLS, `baton health` checks
            # 127.0.0.1:$BATON_PORT with the container's cluster credentials.
            assert "grpc" not in readiness, service
            assert readiness["exec"]["command"] == ["baton", "health"], service
            assert readiness["timeoutSeconds"] >= 5, service
        else:
            assert readiness["grpc"]["port"] == defaults["BATON_PORT"], service
        seen.add(service)
    assert seen == set(SERVICES)


def http_probe(c: dict, probe: str) -> tuple[str, int]:
    """(path, port number) of a container's httpGet probe; a named port resolves to its number."""
    get = c[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    return get["path"], ports.get(get["port"], get["port"])


def test_liveness_is_livez_on_the_metrics_port_for_every_service(rendered):
    # Not gRPC health: that is NOT_SERVING while a service drains or Redis is away, and a
    # liveness probe that fails then restarts a pod in the middle of its drain.
    _, docs = rendered
    for service, c in containers(docs):
        assert not {"grpc", "exec", "tcpSocket"} & set(c["livenessProbe"]), service
        assert http_probe(c, "livenessProbe") == ("/livez", settings_of(service)["BATON_METRICS_PORT"]), service
        assert c["livenessProbe"]["httpGet"].get("scheme", "HTTP") == "HTTP", service  # the metrics port is plain


def test_startup_waits_for_readyz_long_enough_for_a_denoiser_to_load_its_models(rendered):
    # kubelet checks neither liveness nor readiness until the startup probe succeeds, and
    # restarts the container when it has failed failureThreshold times in a row.
    _, docs = rendered
    for service, c in containers(docs):
        startup = c["startupProbe"]
        assert http_probe(c, "startupProbe") == ("/readyz", settings_of(service)["BATON_METRICS_PORT"]), service
        allowed_s = startup["periodSeconds"] * startup["failureThreshold"]
        assert allowed_s >= (600 if service == "denoiser" else 300), (service, allowed_s)


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


@pytest.mark.parametrize("overlay", ["gpu", "secure"])
def test_the_gpu_overlay_gives_denoisers_gpus_and_autoscaling(overlay):
    docs = render(overlay)
    denoisers = [c for s, c in containers(docs) if s == "denoiser"]
    assert len(denoisers) == 2 and all(c["resources"]["limits"]["nvidia.com/gpu"] == 1 for c in denoisers)
    autoscalers = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert {d["spec"]["scaleTargetRef"]["name"] for d in autoscalers} == {"baton-denoiser", "baton-denoiser-flux"}
    for hpa in autoscalers:  # on windows, per pod, not on gRPC calls (health checks are calls too)
        metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert metrics == {"baton_denoise_windows_in_flight", "baton_denoise_windows_queued"}, hpa["metadata"]
        assert len(hpa["spec"]["metrics"]) == 2, hpa["metadata"]


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


# Pod Security Standards, the "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards),
# written out rule by rule: baseline's rules and restricted's own.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Where a container with a read-only root writes: /tmp for every service, and the Hugging Face
# cache (the image's HF_HOME=/models/hf) where models or interposer weights are fetched.
WRITES = {"redis": {"/data"}, "denoiser": {"/tmp", "/models"}, "interposer": {"/tmp", "/models"}}


def pod_templates(docs: list[dict]):
    """(workload name, pod template) for every workload in the rendered documents."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield doc["metadata"]["name"], doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]


def _selinux_and_apparmor(where: str, sc: dict) -> list[str]:
    out = []
    selinux = sc.get("seLinuxOptions", {})
    if selinux.get("type", "container_t") not in SELINUX_TYPES or "user" in selinux or "role" in selinux:
        out.append(f"{where}: seLinuxOptions {selinux}")
    if sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
        out.append(f"{where}: appArmorProfile {sc['appArmorProfile']}")
    if sc.get("windowsOptions", {}).get("hostProcess"):
        out.append(f"{where}: windowsOptions.hostProcess")
    return out


def restricted_violations(name: str, template: dict) -> list[str]:
    """What in one pod template the restricted profile forbids; empty when it complies."""
    spec, annotations = template["spec"], template.get("metadata", {}).get("annotations", {})
    pod = spec.get("securityContext", {})
    out = [f"{name}: {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    out += _selinux_and_apparmor(name, pod)
    out += [
        f"{name}: volume {v['name']} is {sorted(set(v) - {'name'})}"
        for v in spec.get("volumes", [])
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES
    ]
    out += [f"{name}: sysctl {s['name']}" for s in pod.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    if pod.get("runAsUser") == 0:
        out.append(f"{name}: runAsUser 0")
    if pod.get("seccompProfile", {}).get("type") == "Unconfined":
        out.append(f"{name}: seccompProfile Unconfined")
    for c in [*spec["containers"], *spec.get("initContainers", []), *spec.get("ephemeralContainers", [])]:
        where, sc = f"{name}/{c['name']}", c.get("securityContext", {})
        out += _selinux_and_apparmor(where, sc)
        apparmor = annotations.get(f"container.apparmor.security.beta.kubernetes.io/{c['name']}", "runtime/default")
        if apparmor != "runtime/default" and not apparmor.startswith("localhost/"):
            out.append(f"{where}: AppArmor annotation {apparmor}")
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        out += [f"{where}: hostPort {p['hostPort']}" for p in c.get("ports", []) if p.get("hostPort")]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: capabilities add {caps['add']}")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            out.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        if sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
    return out


def test_the_restricted_check_finds_what_the_profile_forbids():
    bad = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0, "sysctls": [{"name": "kernel.msgmax"}]},
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {
                    "privileged": True,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                    "seccompProfile": {"type": "Unconfined"},
                },
            }
        ],
    }
    found = "\n".join(restricted_violations("bad", {"spec": bad}))
    for rule in (
        "hostNetwork",
        "hostPath",
        "kernel.msgmax",
        "runAsUser 0",
        "hostPort 80",
        "privileged",
        "allowPrivilegeEscalation",
        "drop ALL",
        "SYS_ADMIN",
        "runAsNonRoot",
        "seccompProfile",
    ):
        assert rule in found, rule


def test_every_pod_meets_pod_security_restricted(rendered):
    _, docs = rendered
    templates = dict(pod_templates(docs))
    assert {f"baton-{s}" for s in SERVICES} <= set(templates)
    assert [v for name, t in templates.items() for v in restricted_violations(name, t)] == []


def test_every_container_has_a_read_only_root_and_volumes_where_it_writes(rendered):
    _, docs = rendered
    claims = {d["metadata"]["name"]: d["spec"].get("volumeClaimTemplates", []) for d in docs if d["kind"] in WORKLOADS}
    for name, template in pod_templates(docs):
        spec = template["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])} | {t["metadata"]["name"] for t in claims.get(name, [])}
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (name, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= volumes, (name, c["name"])
            service = c["args"][1] if c.get("args", [None])[0] == "serve" else c["name"]
            assert WRITES.get(service, {"/tmp"}) <= set(mounts), (name, c["name"], mounts)


def test_compose_runs_every_container_read_only_without_capabilities():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert "no-new-privileges:true" in service["security_opt"], name
        if name != "redis":
            assert "/tmp" in service["tmpfs"], name
    for name in ("denoiser", "interposer"):
        assert "models:/models" in compose["services"][name]["volumes"], name


# TLS and authentication (overlays/secure = gpu + components/secure; compose.tls.yaml): the
# Secrets the operator creates, their keys, and the settings that name the files in them.
SECRETS = {"baton-tls": {"tls.crt", "tls.key", "ca.crt"}, "baton-auth": {"auth.yaml", "cluster-token"}}
SECURE_FILES = (  # every Baton container: its own port's TLS and identities, its channels to workers
    "BATON_TLS_CERT",
    "BATON_TLS_KEY",
    "BATON_AUTH_FILE",
    "BATON_CLUSTER_CA",
    "BATON_CLUSTER_CERT",
    "BATON_CLUSTER_KEY",
    "BATON_CLUSTER_TOKEN_FILE",
)
WORKER_FILES = ("BATON_TLS_CLIENT_CA",)  # workers serve only the cluster: mTLS


def secret_commands(text: str) -> dict[str, set[str]]:
    """Secret name -> its keys, from the `kubectl create secret generic NAME --from-file=[KEY=]PATH` lines
    (without KEY=, the key is the file's name)."""
    found = re.findall(r"kubectl create secret generic (baton-(?:tls|auth))((?: --from-file=\S+)+)", text)
    return {
        name: {
            f.partition("=")[0] if "=" in f else f.rpartition("/")[2] for f in re.findall(r"--from-file=(\S+)", files)
        }
        for name, files in found
    }


def test_the_secrets_the_docs_tell_operators_to_create_have_the_keys_the_manifests_read():
    secure = DEPLOY / "k8s" / "overlays" / "secure" / "kustomization.yaml"
    for doc in (DEPLOY / "README.md", secure):
        assert secret_commands(doc.read_text()) == SECRETS, doc


def test_only_the_secure_overlay_needs_the_tls_and_auth_secrets_and_none_is_committed():
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] in SECRETS], overlay
        used = {
            v["secret"]["secretName"]
            for _, t in pod_templates(docs)
            for v in t["spec"].get("volumes", [])
            if "secret" in v
        }
        assert (used & set(SECRETS)) == (set(SECRETS) if overlay == "secure" else set()), overlay


def test_the_secure_overlay_points_every_baton_container_at_files_on_read_only_secret_volumes():
    docs = render("secure")
    seen = []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        for mode in (s.get("defaultMode", 0o644) for s in secrets.values()):
            assert mode & ~0o440 == 0, f"{doc['metadata']['name']}: defaultMode {mode:o}"
        for service, c in containers([doc]):
            where = f"{doc['metadata']['name']}/{c['name']}"
            mounts = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"] in secrets}
            assert all(m.get("readOnly") is True for m in mounts.values()), where
            env = {e["name"]: e.get("value", "") for e in c["env"]}
            wanted = SECURE_FILES + (WORKER_FILES if service != "gateway" else ())
            for var in wanted:
                folder, _, key = env.get(var, "").rpartition("/")
                assert folder in mounts, f"{where}: {var}={env.get(var)!r} is not on a mounted Secret"
                secret = secrets[mounts[folder]["name"]]["secretName"]
                assert key in SECRETS[secret], f"{where}: {var} names {key!r}, not a key of {secret}"
            assert env.get("BATON_CLUSTER_SERVER_NAME"), where  # workers are dialled by pod IP
            seen.append(doc["metadata"]["name"])
    assert sorted(seen) == sorted([f"baton-{s}" for s in SERVICES] + ["baton-denoiser-flux"])


def test_the_compose_tls_override_mounts_the_files_read_only_for_every_baton_service():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    override = yaml.safe_load((DEPLOY / "compose.tls.yaml").read_text())
    baton = {name for name in compose["services"] if name != "redis"}
    assert set(override["services"]) == baton
    ignored = (DEPLOY / ".gitignore").read_text().split()
    for name, service in override["services"].items():
        assert set(service) <= {"environment", "volumes"}, f"{name}: the override leaves the hardening alone"
        known = settings_of(name)
        env = service["environment"]
        assert all(k in known for k in env if k.startswith("BATON_")), name
        mounts = {}
        for volume in service["volumes"]:
            source, target, mode = volume.split(":")
            assert mode == "ro" and source.startswith("./"), (name, volume)
            assert f"/{source.removeprefix('./')}/" in ignored, f"{source} holds secrets: git-ignore it"
            mounts[target] = source
        for var in SECURE_FILES + (WORKER_FILES if name != "gateway" else ()):
            folder, _, key = env.get(var, "").rpartition("/")
            assert folder in mounts, f"{name}: {var}={env.get(var)!r} is not on a mounted folder"
            assert key in set().union(*SECRETS.values()), (name, var)
        assert env.get("BATON_CLUSTER_SERVER_NAME"), name
