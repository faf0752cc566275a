"""LocalCluster: a Redis and the four services as child processes on loopback.

Used by `baton up` and `baton run` without `--gateway`. Children die with their parent
(PR_SET_PDEATHSIG), so even a killed parent leaves no process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.redis_server import redis_argv, wait_for_ping

SERVICES = ("gateway", "denoiser", "interposer", "processor")
DEFAULT_PORTS = {"gateway": 50051, "denoiser": 50052, "interposer": 50053, "processor": 50054}
_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    if preferred and port_is_free(preferred, host):
        return preferred
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_status(address: str, timeout: float = 1.0, service: str = "") -> str:
    """The grpc.health.v1 status name of `address`, or UNREACHABLE."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path | None
    address: str = ""
    metrics_port: int = 0

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class LocalCluster:
    """Starts Redis (unless `redis_url` is given) and the services; stops them all."""

    def __init__(
        self,
        services: Sequence[str] = SERVICES,
        *,
        redis_url: str | None = None,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        default_ports: bool = True,
    ):
        self.services = tuple(services)
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.service_env = {k: dict(v) for k, v in (service_env or {}).items()}
        self.default_ports = default_ports
        self.children: list[Child] = []
        self._tmp: str | None = None

    # -- start -----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> LocalCluster:
        try:
            if not self.redis_url:
                self.redis_url = self._start_redis()
            for name in self.services:
                self._start_service(name)
            self._wait_serving(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        log: IO | int | None = subprocess.DEVNULL if name == "redis" else None
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
            log = open(log_path, "ab")  # noqa: SIM115 - the child owns it until stop()
        process = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        if log_path is not None and log is not None and not isinstance(log, int):
            log.close()  # the child has its own descriptor now
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def _start_redis(self) -> str:
        self._tmp = tempfile.mkdtemp(prefix="baton-redis-")
        port = free_port()
        child = self._spawn("redis", redis_argv(port, Path(self._tmp)), {})
        wait_for_ping(port, child.process, timeout=15)
        child.address = f"127.0.0.1:{port}"
        return f"redis://127.0.0.1:{port}/0"

    def _start_service(self, name: str) -> None:
        port = free_port(DEFAULT_PORTS[name] if self.default_ports else 0)
        metrics_port = free_port(DEFAULT_PORTS[name] - 50051 + 9151 if self.default_ports else 0)
        env = {
            "BATON_HOST": "127.0.0.1",
            "BATON_PORT": str(port),
            "BATON_METRICS_PORT": str(metrics_port),
            "BATON_REDIS_URL": self.redis_url or "",
            "PYTHONUNBUFFERED": "1",
            **self.env,
            **self.service_env.get(name, {}),
        }
        child = self._spawn(name, [sys.executable, "-m", f"services.{name}"], env)
        child.address = f"127.0.0.1:{port}"
        child.metrics_port = metrics_port

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [c for c in self.children if c.name in self.services]
        while pending:
            for child in list(pending):
                if child.process.poll() is not None:
                    raise ClusterError(
                        f"{child.name} exited with {child.process.returncode} while starting\n{child.log_tail()}"
                    )
                if health_status(child.address, timeout=0.5) == "SERVING":
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise ClusterError(f"not SERVING after {timeout:.0f} s: {names}")
            if pending:
                time.sleep(0.1)

    # -- use -------------------------------------------------------------------------------
    def address(self, name: str) -> str:
        for child in self.children:
            if child.name == name:
                return child.address
        raise KeyError(name)

    def describe(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for c in self.children:
            entry: dict[str, object] = {"address": c.address, "pid": c.process.pid}
            if c.name == "redis":
                entry["url"] = self.redis_url
            else:
                entry["metrics"] = f"http://127.0.0.1:{c.metrics_port}/metrics"
            out[c.name] = entry
        return out

    # -- stop ------------------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the services (they drain), then Redis; SIGKILL whatever outlives `grace`."""
        services = [c for c in self.children if c.name != "redis"]
        redis = [c for c in self.children if c.name == "redis"]
        for group in (services, redis):
            for c in group:
                if c.process.poll() is None:
                    c.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for c in group:
                try:
                    c.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.process.kill()
                    c.process.wait()
        self.children.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
