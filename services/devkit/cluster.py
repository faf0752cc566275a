"""Redis and Baton services as child processes on loopback: the one harness that `baton up`,
`baton run`, the tests and the benchmarks share.

Every child gets free loopback ports, dies with its parent (PR_SET_PDEATHSIG: with the thread
that started it, strictly), and is waited for with a bound that says why it never became ready.
Fault tests kill, pause and restart any of them on the same port.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import PLAINTEXT, ClientTLS, open_channel

SERVICES = ("gateway", "denoiser", "interposer", "processor")
DEFAULT_PORTS = {"gateway": 50051, "denoiser": 50052, "interposer": 50053, "processor": 50054}
PERSISTENCE = {
    "none": ("--save", "", "--appendonly", "no"),
    # Every write is on disk before Redis answers, so a SIGKILL loses nothing that was acknowledged.
    "aof": ("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
}
_CLUSTER_NODE_ARGS = (
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "5000",
)
MAX_RECEIVE_BYTES = 64 << 20

# Where a child's stdout and stderr go, as Popen takes it: a file (appended to), subprocess.DEVNULL,
# or None for the parent's own terminal.
Log = Path | int | None

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., object] | None
try:  # resolved here, in the parent: the child should load no library between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_handed_out: set[int] = set()


class ClusterError(RuntimeError):
    pass


class RedisServerError(ClusterError):
    pass


# -- ports and health -------------------------------------------------------------------------
def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _well_known() -> set[int]:
    return {*DEFAULT_PORTS.values(), *(port - 50051 + 9151 for port in DEFAULT_PORTS.values())}


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if it is free, else a free port this process has not handed out before (a child
    binds its port only once it runs, so two children chosen in a row must not get the same one),
    and never a well-known one: a service on a chosen port must not take the port `baton up` wants."""
    if preferred and port_is_free(preferred, host):
        _handed_out.add(preferred)
        return preferred
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out and port not in _well_known():
            _handed_out.add(port)
            return port


def health_status(address: str, timeout: float = 1.0, service: str = "", tls: ClientTLS = PLAINTEXT) -> str:
    """The grpc.health.v1 status name of `address`, or UNREACHABLE."""
    with open_channel(address, [], tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def ping(port: int, timeout: float = 0.2) -> bool:
    """True when a Redis on loopback `port` answers PING (not while it is still loading its AOF)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


# -- child processes --------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(argv: list[str], env: Mapping[str, str], log: Log, cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` with stdout and stderr to `log`, over this process's environment."""
    if isinstance(log, Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:  # the child has a descriptor of its own once started
            return _spawn(argv, env, out.fileno(), cwd)
    return subprocess.Popen(
        argv,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )


def _terminate(processes: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM them all (and SIGCONT, so a paused one acts on it); SIGKILL whatever outlives `grace`."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _kill(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait()


def _log_tail(log: Log, lines: int) -> str:
    if not isinstance(log, Path) or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- Redis ------------------------------------------------------------------------------------
class RedisServer:
    """A throwaway redis-server bound to loopback with its own --dir; the same port and dir across
    restarts, so an AOF written before a kill is loaded again."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int = 0,
        persistence: str = "none",
        extra_args: Sequence[str] = (),
        log: Log = subprocess.DEVNULL,
    ):
        if persistence not in PERSISTENCE:
            raise ValueError(f"persistence must be one of {', '.join(PERSISTENCE)}, not {persistence!r}")
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_args = tuple(extra_args)
        self.log = log
        self._own_dir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="baton-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RedisServerError(f"redis-server on port {self.port} has not been started")
        return self.process.pid

    @property
    def running(self) -> bool:
        """True from start() until it exits (a paused server is running)."""
        return self.process is not None and self.process.poll() is None

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "no redis-server on PATH: install it (`apt-get install redis-server`, `brew install redis`, "
                "or `make setup` as root) or set REDIS_URL to a running Redis"
            )
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            *PERSISTENCE[self.persistence],
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        if self.running:
            raise RedisServerError(f"redis-server on port {self.port} is already running")
        argv = self.argv()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(argv, {}, self.log)
        try:
            self._wait_for_ping(timeout)
        except BaseException:
            _kill(self.process)
            raise
        return self

    def _wait_for_ping(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server on port {self.port} exited with {self.process.returncode}")
            if ping(self.port):
                return
            time.sleep(0.05)
        raise RedisServerError(f"redis-server on port {self.port} did not answer PING within {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL: what it had not written to disk is gone."""
        _kill(self.process)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, as with a hung server."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 15.0, grace: float = 10.0) -> RedisServer:
        """Stop it if it runs, start it again on the same port and dir, and wait for PING."""
        if self.process is not None:
            _terminate([self.process], grace)
        return self.start(timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `grace`; remove its dir if this object made it."""
        if self.process is not None:
            _terminate([self.process], grace)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServers:
    """A Redis Cluster of `masters` redis-servers with no replicas, the slots split by redis-cli."""

    def __init__(self, workdir: Path | None = None, masters: int = 3):
        self._own_dir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="baton-redis-cluster-"))
        self.nodes = [
            RedisServer(self.workdir / str(port), port=port, extra_args=_CLUSTER_NODE_ARGS)
            for port in _cluster_ports(masters)
        ]

    @property
    def url(self) -> str:
        """The first node's URL; a cluster client finds the others from it."""
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerError("no redis-cli on PATH: it comes with redis-server (`apt-get install redis-server`)")
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(n.address for n in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self._wait_cluster_ok(timeout / 2)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_cluster_ok(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with redis.Redis(port=node.port) as client:
                    states.append(client.cluster("info").get("cluster_state"))
            if all(s == "ok" for s in states):
                return
            time.sleep(0.1)
        raise RedisServerError(f"Redis Cluster on {[n.port for n in self.nodes]} not ok after {timeout:.0f} s")

    def stop(self, grace: float = 10.0) -> None:
        _terminate([n.process for n in self.nodes if n.process is not None], grace)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is valid and free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 50000)
        if port not in ports and port not in _handed_out and port_is_free(port) and port_is_free(port + 10000):
            _handed_out.add(port)
            ports.append(port)
    return ports


# -- services ---------------------------------------------------------------------------------
class ServiceProcess:
    """One Baton service, `python -m services.<kind>` (or `module`), on loopback ports of its own.

    `name` labels it in logs and errors (default: the kind). Caller `env` goes over the harness's.
    """

    def __init__(
        self,
        kind: str,
        redis_url: str = "",
        env: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        module: str | None = None,
        log: Log = subprocess.DEVNULL,
        port: int = 0,
        metrics_port: int = 0,
        cwd: Path | None = None,
    ):
        self.kind = kind
        self.name = name or kind
        self.module = module or f"services.{kind}"
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log = log
        self.cwd = cwd
        self.env = {
            "BATON_HOST": "127.0.0.1",
            "BATON_PORT": str(self.port),
            "BATON_METRICS_PORT": str(self.metrics_port),
            "BATON_REDIS_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None
        # How this harness reaches it: set for a service that serves TLS (and asks for a certificate).
        self.tls: ClientTLS = PLAINTEXT

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def running(self) -> bool:
        """True from start() until it exits (a paused process is running)."""
        return self.process is not None and self.process.poll() is None

    @property
    def channel(self) -> grpc.Channel:
        """A channel to it, made on first use; it reconnects across restarts on the same port."""
        if self._channel is None:
            options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
            self._channel = open_channel(self.address, options, self.tls)
        return self._channel

    def _started(self) -> subprocess.Popen:
        if self.process is None:
            raise ClusterError(f"{self.name} has not been started")
        return self.process

    # -- run ------------------------------------------------------------------------------------
    def start(self) -> ServiceProcess:
        """Spawn it; wait_serving() waits until it is ready. It gets SIGTERM when the thread that
        started it ends, so start it from one that outlives it (the main thread, say)."""
        if self.running:
            raise ClusterError(f"{self.name} is already running")
        self.process = _spawn([sys.executable, "-m", self.module], self.env, self.log, self.cwd)
        return self

    def wait_serving(self, timeout: float = 120.0) -> ServiceProcess:
        wait_all_serving([self], timeout)
        return self

    def restart(self, timeout: float = 120.0, grace: float = 20.0) -> ServiceProcess:
        """Stop it if it runs, start it again with the same ports and env, and wait until SERVING."""
        if self.process is not None:
            _terminate([self.process], grace)
        return self.start().wait_serving(timeout)

    # -- look -----------------------------------------------------------------------------------
    def health(self, timeout: float = 1.0) -> str:
        return health_status(self.address, timeout, tls=self.tls)

    def metrics(self) -> dict[str, float]:
        """Its /metrics as {sample with labels: value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log, lines)

    # -- signals --------------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        self._started().send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: its connections stay open but nothing answers, as with a hung process."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, once it has exited."""
        return self._started().wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap: no drain, no deregistration."""
        _kill(self.process)

    def stop(self, grace: float = 20.0) -> None:
        stop_all([self], grace)

    def __enter__(self) -> ServiceProcess:
        return self.start().wait_serving()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# The services that register themselves for gateways to route to.
WORKER_KINDS = ("denoiser", "interposer", "processor")


def wait_all_serving(processes: Sequence[ServiceProcess], timeout: float) -> None:
    """Wait until each started process says SERVING; raise at once if one exits, with its log."""
    deadline = time.monotonic() + timeout
    pending = list(processes)
    while pending:
        for p in list(pending):
            process = p._started()
            if process.poll() is not None:
                raise ClusterError(f"{p.name} exited with {process.returncode} while starting\n{p.log_tail()}")
            if p.health(timeout=0.5) == "SERVING":
                pending.remove(p)
        if pending and time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            tails = "".join(f"\n-- {p.name}:\n{tail}" for p in pending if (tail := p.log_tail()))
            raise ClusterError(f"not SERVING after {timeout:.0f} s: {names}{tails}")
        if pending:
            time.sleep(0.1)


def stop_all(processes: Sequence[ServiceProcess], grace: float) -> None:
    """SIGTERM them all at once (they drain in parallel); SIGKILL whatever outlives `grace`."""
    _terminate([p.process for p in processes if p.process is not None], grace)
    for p in processes:
        if p._channel is not None:
            p._channel.close()
            p._channel = None


# -- a whole cluster --------------------------------------------------------------------------
class LocalCluster:
    """Redis (unless `redis_url` is given) and the services, `replicas` of a kind where asked;
    `add()` starts one more at run time. stop() drains the services, then stops Redis."""

    def __init__(
        self,
        services: Sequence[str] = SERVICES,
        *,
        redis_url: str | None = None,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
        default_ports: bool = True,
        replicas: Mapping[str, int] | None = None,
        redis_persistence: str = "none",
        cwd: Path | None = None,
        probe_tls: ClientTLS = PLAINTEXT,
    ):
        self.services = tuple(services)
        # How the harness reaches services that serve TLS (health probes, their `channel`).
        self.probe_tls = probe_tls
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.service_env = {k: dict(v) for k, v in (service_env or {}).items()}
        self.default_ports = default_ports
        self.replicas = dict(replicas or {})
        self.redis_persistence = redis_persistence
        self.cwd = cwd
        self.redis: RedisServer | None = None
        self._processes: list[ServiceProcess] = []

    def start(self, timeout: float = 120.0) -> LocalCluster:
        """Start everything and wait until every service is SERVING; on failure stop what started."""
        try:
            if not self.redis_url:
                log = self.log_dir / "redis.log" if self.log_dir else subprocess.DEVNULL
                self.redis = RedisServer(persistence=self.redis_persistence, log=log).start()
                self.redis_url = self.redis.url
            started = [self._spawn(kind) for kind in self.services for _ in range(self.replicas.get(kind, 1))]
            wait_all_serving(started, timeout)
            self._wait_registered(started)
        except BaseException:
            self.stop()
            raise
        return self

    def add(self, kind: str, env: Mapping[str, str] | None = None, timeout: float = 120.0) -> ServiceProcess:
        """One more `kind` service (its kind's env, then `env`), SERVING."""
        if not self.redis_url:
            raise ClusterError("start() the cluster before adding services to it")
        process = self._spawn(kind, env)
        try:
            wait_all_serving([process], timeout)
            self._wait_registered([process])
        except BaseException:
            process.kill()
            self._processes.remove(process)
            raise
        return process

    def _wait_registered(self, processes: Sequence[ServiceProcess], timeout: float = 30.0) -> None:
        """Waits until each worker among `processes` has its record in the registry: a worker says
        SERVING a moment before it registers, and a gateway routes only to registered workers. A
        cluster whose records this cannot read (another key prefix) goes on after `timeout`."""
        workers = [p for p in processes if p.kind in WORKER_KINDS]
        if not workers or not self.redis_url:
            return
        from services.common.redis_conn import connect
        from services.common.registry import WorkerRegistry

        client = connect(self.redis_url)
        try:
            registry = WorkerRegistry(client)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    known = {w.address for kind in {p.kind for p in workers} for w in registry.workers(kind)}
                except Exception:  # a Redis this harness cannot read as the services do
                    return
                if all(p.address in known for p in workers):
                    return
                time.sleep(0.1)
        finally:
            client.close()

    def _spawn(self, kind: str, env: Mapping[str, str] | None = None) -> ServiceProcess:
        n = len(self.processes(kind))
        name = f"{kind}-{n + 1}" if n else kind
        # Only the first of a kind gets the well-known ports: the others would find them still free.
        default = DEFAULT_PORTS.get(kind, 0) if self.default_ports and not n else 0
        process = ServiceProcess(
            kind,
            self.redis_url or "",
            {**self.env, **self.service_env.get(kind, {}), **(env or {})},
            name=name,
            log=self.log_dir / f"{name}.log" if self.log_dir else None,
            port=free_port(default),
            metrics_port=free_port(default - 50051 + 9151 if default else 0),
            cwd=self.cwd,
        )
        process.tls = self.probe_tls
        self._processes.append(process.start())
        return process

    # -- use ------------------------------------------------------------------------------------
    def processes(self, kind: str | None = None) -> list[ServiceProcess]:
        """The service processes of `kind` (all kinds if None), in the order they started."""
        return [p for p in self._processes if kind is None or p.kind == kind]

    def address(self, name: str) -> str:
        for p in self._processes:
            if p.name == name:
                return p.address
        raise KeyError(name)

    def describe(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        if self.redis is not None and self.redis.process is not None:
            out["redis"] = {"address": self.redis.address, "pid": self.redis.pid, "url": self.redis_url}
        for p in self._processes:
            out[p.name] = {"address": p.address, "pid": p.pid, "metrics": f"http://127.0.0.1:{p.metrics_port}/metrics"}
        return out

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of each child that has exited."""
        children = [(p.name, p.process) for p in self._processes]
        if self.redis is not None:
            children.insert(0, ("redis", self.redis.process))
        return [(name, code) for name, process in children if process and (code := process.poll()) is not None]

    # -- stop -----------------------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the services (they drain), then Redis; SIGKILL whatever outlives `grace`."""
        stop_all(self._processes, grace)
        self._processes.clear()
        if self.redis is not None:
            self.redis.stop(grace)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
