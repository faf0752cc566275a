"""Settings that read the same from a flag, an env var and a Kubernetes manifest.

Every setting `--some-name` is also `BATON_SOME_NAME`; the flag wins over the env var, the
env var over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}, got {text!r}")


@dataclass(frozen=True)
class Setting:
    """One knob: its flag name (without dashes), default, type and why it exists."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()
    # Other env vars honoured after BATON_<NAME>, e.g. the conventional REDIS_URL.
    fallback_env: tuple[str, ...] = field(default=())

    @property
    def env(self) -> str:
        return "BATON_" + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def with_default(self, default: Any) -> Setting:
        return replace(self, default=default)

    def from_env(self, environ: Mapping[str, str]) -> Any:
        for var in (self.env, *self.fallback_env):
            if var in environ:
                try:
                    return self.type(environ[var])
                except ValueError as exc:
                    raise SystemExit(f"{var}={environ[var]!r}: {exc}") from None
        return self.default


MIB = 1 << 20

COMMON = (
    Setting("host", "127.0.0.1", "address to listen on; 0.0.0.0 for every interface (containers set it)"),
    Setting("port", 0, "gRPC port", int),
    Setting("metrics-port", 0, "HTTP port of /metrics (Prometheus), /livez and /readyz (probes); 0 turns it off", int),
    Setting(
        "redis-url",
        "redis://127.0.0.1:6379/0",
        "Redis holding blobs, jobs and the worker registry (redis:// or rediss://)",
        fallback_env=("REDIS_URL",),
    ),
    Setting(
        "redis-cluster",
        "auto",
        "treat Redis as a Redis Cluster; auto asks the server",
        choices=("auto", "yes", "no"),
    ),
    Setting(
        "redis-timeout",
        3.0,
        "seconds a Redis connect or reply may take; past it the call fails UNAVAILABLE instead of hanging",
        float,
    ),
    Setting("blob-ttl", 3600.0, "seconds a blob lives; long enough for any stage to read it", float),
    Setting(
        "blob-chunk-bytes",
        4 * MIB,
        "largest Redis value a blob is split into; keeps big tensors off one slow value",
        int,
    ),
    Setting(
        "max-message-bytes",
        64 * MIB,
        "gRPC send/receive limit; the 4 MiB default is too small for embeddings and previews",
        int,
    ),
    Setting(
        "grace-period",
        30.0,
        "seconds in-flight calls get to finish after SIGTERM; keep below Kubernetes' terminationGracePeriodSeconds",
        float,
    ),
    Setting(
        "max-concurrency",
        64,
        "gRPC calls served at once (health checks and reflection excepted); more are refused RESOURCE_EXHAUSTED",
        int,
    ),
    Setting(
        "keepalive",
        10.0,
        "seconds between gRPC keepalive pings on every server and channel; a dead or frozen peer is noticed "
        "after this plus keepalive-timeout",
        float,
    ),
    Setting("keepalive-timeout", 5.0, "seconds a keepalive ping may go unanswered before the connection drops", float),
    Setting("tls-cert", "", "PEM certificate this service serves TLS with (re-read when the file changes)"),
    Setting("tls-key", "", "PEM private key of tls-cert"),
    Setting("tls-client-ca", "", "PEM CA that must have signed a client's certificate (mTLS); empty: none asked for"),
    Setting(
        "auth-file",
        "",
        "YAML identities file: hashed tokens and certificate subjects mapped to tenants and roles (re-read when it "
        "changes); empty with no tls-client-ca: no authentication",
    ),
    Setting("auth-open-health", True, "health checks and reflection answer without credentials", parse_bool),
    Setting("cluster-ca", "", "PEM CA that verifies workers' certificates on this service's channels to them"),
    Setting("cluster-cert", "", "PEM client certificate this service presents to workers (mTLS)"),
    Setting("cluster-key", "", "PEM private key of cluster-cert"),
    Setting("cluster-server-name", "", "name workers' certificates are checked against instead of their address"),
    Setting("cluster-token-file", "", "file holding the bearer token this service presents to workers"),
    Setting("log-level", "info", "log level", choices=("debug", "info", "warning", "error")),
    Setting("log-format", "json", "json lines for log collectors, text for people", choices=("json", "text")),
    Setting(
        "otlp-endpoint",
        "",
        "OpenTelemetry collector (OTLP/gRPC, e.g. http://otel-collector:4317) that traces go to; empty: none are "
        "exported, yet trace ids still name jobs in logs and in Get's info",
        fallback_env=("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ),
)


# Settings of the services that register as workers (denoiser, interposer, processor).
WORKER = (
    Setting(
        "advertise-address",
        "",
        "host:port the gateway dials for this worker; default: this host's name (or --host) and --port. "
        "In Kubernetes, the pod IP",
    ),
    Setting("registry-ttl", 10.0, "seconds a worker stays registered without a heartbeat", float),
    Setting(
        "torch-threads",
        0,
        "CPU threads torch uses in this process; 0 keeps torch's default (one per core). Set cores / workers when "
        "several workers share a machine, or their threads fight over the cores",
        int,
    ),
    Setting(
        "max-queued",
        4,
        "calls waiting in this worker's own queue besides those it runs; more are refused RESOURCE_EXHAUSTED "
        "so the gateway tries another worker",
        int,
    ),
)


def service_settings(
    port: int,
    metrics_port: int,
    extra: Iterable[Setting] = (),
    *,
    worker: bool = False,
    defaults: dict[str, Any] | None = None,
) -> tuple[Setting, ...]:
    """The common settings with a service's defaults (ports, ...), plus a worker's, plus its own."""
    defaults = {"port": port, "metrics-port": metrics_port, **(defaults or {})}
    common = tuple(s.with_default(defaults[s.name]) if s.name in defaults else s for s in COMMON)
    return common + (WORKER if worker else ()) + tuple(extra)


def build_parser(prog: str, description: str, settings: Sequence[Setting]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_settings(parser, settings)
    return parser


def add_settings(
    parser: argparse.ArgumentParser, settings: Sequence[Setting], environ: Mapping[str, str] | None = None
) -> None:
    env = os.environ if environ is None else environ
    for s in settings:
        default = s.from_env(env)
        text = f"{s.help} [env {s.env}]"
        if s.type is parse_bool:
            parser.add_argument(f"--{s.name}", default=default, help=text, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(f"--{s.name}", default=default, help=text, type=s.type, choices=s.choices or None)


def parse_settings(
    settings: Sequence[Setting], argv: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Settings from argv over environ over defaults, without a program around them."""
    parser = argparse.ArgumentParser(add_help=False)
    add_settings(parser, settings, environ)
    return parser.parse_args(list(argv))
