"""The service runtime every Baton service runs in.

gRPC (asyncio) with health checking and reflection, one status interceptor, raised message
limits and keepalive, Prometheus metrics and the /livez and /readyz probes over HTTP
(http_endpoints), structured logs, settings from flags and env vars, and a graceful drain on
SIGTERM: the worker leaves the registry, health goes NOT_SERVING, the service's drain hooks run
(a denoiser finishes or hands off its windows), in-flight calls get what is left of
`grace-period`, then the process exits. Health is also NOT_SERVING while Redis cannot be
reached: a service without Redis can serve nothing. /readyz says what health says; /livez only
whether the event loop runs, so a drain or a Redis outage never gets a pod restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import http_endpoints, tracing
from services.common.auth import CLUSTER, CLUSTER_ONLY, TENANTS, USER, Authenticator, Gate, method_roles
from services.common.blobs import BlobStore
from services.common.config import Setting, build_parser
from services.common.errors import InvalidArgument, Unavailable
from services.common.grpc_options import server_options
from services.common.interceptor import StatusInterceptor
from services.common.logs import setup_logging
from services.common.redis_conn import REDIS_DOWN, Client, connect, redact
from services.common.registry import WorkerRegistry, new_worker_id
from services.common.tls import ClientTLS, add_port, server_credentials

log = logging.getLogger("baton.server")


@dataclass
class Mount:
    """A servicer and the generated function that adds it to a server."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    # Full service name, e.g. "baton.v1.Denoiser", for health and reflection.
    name: str
    # Roles that may call its RPCs (auth.requires marks exceptions): workers serve only the cluster.
    callers: frozenset[str] = CLUSTER_ONLY


@dataclass
class Service:
    """What a service is: its name, settings, and how to build its servicers."""

    name: str
    description: str
    settings: Sequence[Setting]
    build: Callable[[argparse.Namespace, Runtime], list[Mount]]


@dataclass
class Runtime:
    """What a service's servicers share: settings and the Redis-backed blob store."""

    settings: argparse.Namespace
    redis: Client
    store: BlobStore
    _closers: list[Callable[[], Any]] = field(default_factory=list)
    _warmups: list[Callable[[], Any]] = field(default_factory=list)
    _starters: list[Callable[[], Any]] = field(default_factory=list)
    _drainers: list[Callable[[float], Any]] = field(default_factory=list)
    # (kind, describe): this process registers as a worker while it serves.
    _worker: tuple[str, Callable[[str], Any]] | None = None
    worker_id: str = ""
    # Set when the worker's record should be rewritten now (its load changed).
    _changed: asyncio.Event | None = None

    def on_shutdown(self, fn: Callable[[], Any]) -> None:
        """Runs `fn` (sync or async) after the server has drained."""
        self._closers.append(fn)

    def advertise(self, kind: str, describe: Callable[[str], Any]) -> None:
        """Registers this process as a `kind` worker; describe(address) returns its WorkerInfo."""
        self._worker = (kind, describe)
        self.worker_id = new_worker_id(kind)

    def on_drain(self, fn: Callable[[float], Any]) -> None:
        """Runs async `fn(deadline)` on SIGTERM, after health went NOT_SERVING; `deadline` is the
        time.monotonic() by which the grace period ends."""
        self._drainers.append(fn)

    def nudge(self) -> None:
        """Rewrites this worker's registry record soon (its load changed), not only at the next heartbeat."""
        if self._changed is not None:
            self._changed.set()

    def on_start(self, fn: Callable[[], Any]) -> None:
        """Runs async `fn` in the server's event loop once it serves (background tasks)."""
        self._starters.append(fn)

    def before_serving(self, fn: Callable[[], Any]) -> None:
        """Runs blocking `fn` (e.g. preloading models) after start; health says SERVING once all are done."""
        self._warmups.append(fn)


def connect_redis(settings: argparse.Namespace, wait_s: float = 20.0) -> Client:
    """Connects, retrying for a while: Redis may come up after us (compose, Kubernetes)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client = connect(settings.redis_url, settings.redis_cluster, settings.redis_timeout)
            client.ping()
            return client
        except Exception as exc:  # ConnectionError, Unavailable, cluster not ready yet
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot reach Redis at {redact(settings.redis_url)}: {exc}") from exc
            time.sleep(0.5)


def cluster_tls(settings: argparse.Namespace) -> ClientTLS:
    """What this service's channels to workers trust and present."""
    return ClientTLS.of(settings.cluster_ca, settings.cluster_cert, settings.cluster_key, settings.cluster_server_name)


def worker_pool(settings: argparse.Namespace, runtime: Runtime, static: dict[str, list[str]], **kwargs: Any):
    """The WorkerPool a service calls other workers through, with this service's limits, keepalive and
    cluster credentials."""
    from services.common.workers import WorkerPool, read_token

    tls = cluster_tls(settings)
    if settings.cluster_token_file:  # refused at start, not at the first call to a worker
        read_token(settings.cluster_token_file)
        if not tls.enabled:
            raise InvalidArgument(
                "cluster-token-file needs cluster-ca: the token is sent to workers only over TLS",
                field="cluster-token-file",
            )
    return WorkerPool(
        WorkerRegistry(runtime.redis),
        static,
        settings.max_message_bytes,
        keepalive_s=settings.keepalive,
        keepalive_timeout_s=settings.keepalive_timeout,
        tls=tls,
        token_file=settings.cluster_token_file,
        **kwargs,
    )


def gate_for(settings: argparse.Namespace, mounts: list[Mount]) -> Gate:
    """Who may call this service: the identities file and client CA, each mount's roles."""
    tenant_facing = any(m.callers == TENANTS for m in mounts)
    authenticator = Authenticator(
        settings.auth_file, settings.tls_client_ca, cert_role=USER if tenant_facing else CLUSTER
    )
    roles: dict[str, frozenset[str]] = {}
    for m in mounts:
        roles.update(method_roles(m.name, m.servicer, m.callers))
    return Gate(authenticator, roles, open_health=settings.auth_open_health)


def make_runtime(settings: argparse.Namespace) -> Runtime:
    client = connect_redis(settings)
    store = BlobStore(client, chunk_bytes=settings.blob_chunk_bytes, ttl_s=settings.blob_ttl)
    return Runtime(settings=settings, redis=client, store=store)


async def serve(service: Service, settings: argparse.Namespace, runtime: Runtime) -> None:
    """Serves until SIGTERM/SIGINT, then drains."""
    if getattr(settings, "torch_threads", 0):
        import torch  # workers only: the gateway never loads torch

        torch.set_num_threads(settings.torch_threads)
    mounts = service.build(settings, runtime)
    tracing.setup(service.name, settings.otlp_endpoint, tenant_facing=any(m.callers == TENANTS for m in mounts))
    server = grpc.aio.server(
        # The limit lives in the interceptor, not in grpc's maximum_concurrent_rpcs, which would
        # refuse health checks too (a Kubernetes probe would restart a merely busy worker).
        # Tracing first (outermost): its span sees the status the StatusInterceptor sets.
        interceptors=[
            tracing.server_interceptor(),
            StatusInterceptor(settings.max_concurrency, gate_for(settings, mounts)),
        ],
        options=server_options(settings.max_message_bytes, settings.keepalive, settings.keepalive_timeout),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for mount in mounts:
        mount.add_to_server(mount.servicer, server)
    names = [m.name for m in mounts]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = add_port(server, settings.host, settings.port, credentials)
    readiness = HealthState(health_servicer, ["", *names], http_endpoints.ProbeState())
    ticker = asyncio.create_task(readiness.probes.tick())
    http = None
    if settings.metrics_port:
        http = http_endpoints.start(settings.host, settings.metrics_port, readiness.probes)
    await server.start()
    await readiness.update()  # NOT_SERVING: warming up
    monitor = asyncio.create_task(_watch_redis(settings, readiness, runtime))
    for warmup in runtime._warmups:  # alive (health answers, /livez 200) but not ready until warm
        await asyncio.to_thread(warmup)
    for start in runtime._starters:
        await start()
    await readiness.update(warm=True)
    log.info(
        "%s serving",
        service.name,
        extra={
            "address": f"{settings.host}:{port}",
            "tls": "mtls" if settings.tls_client_ca else "tls" if credentials else "plaintext",
            "metrics_port": settings.metrics_port,
            "services": names,
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    heartbeat = None
    runtime._changed = asyncio.Event()
    if runtime._worker is not None:
        heartbeat = asyncio.create_task(_heartbeat(runtime, settings, advertised_address(settings, port)))
    await stop.wait()

    deadline = time.monotonic() + settings.grace_period
    log.info("%s draining", service.name, extra={"grace_period_s": settings.grace_period})
    monitor.cancel()
    if heartbeat is not None:
        heartbeat.cancel()
        kind, _ = runtime._worker  # type: ignore[misc]
        with contextlib.suppress(*REDIS_DOWN):
            await asyncio.to_thread(WorkerRegistry(runtime.redis).withdraw, kind, runtime.worker_id)
    await readiness.update(draining=True)  # not ready, still alive: liveness must not kill a drain
    await health_servicer.enter_graceful_shutdown()
    for drain in runtime._drainers:
        try:
            await drain(deadline)
        except Exception:
            log.warning("drain hook failed", exc_info=True)
    await server.stop(max(deadline - time.monotonic(), 0.0))
    for close in runtime._closers:
        result = close()
        if asyncio.iscoroutine(result):
            await result
    ticker.cancel()
    if http is not None:
        http.shutdown()
        http.server_close()
    log.info("%s stopped", service.name)


def advertised_address(settings: argparse.Namespace, port: int) -> str:
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


class HealthState:
    """Readiness, for gRPC health (every service name) and /readyz alike: SERVING only when warm,
    connected to Redis and not draining."""

    def __init__(self, servicer: health.aio.HealthServicer, names: list[str], probes: http_endpoints.ProbeState):
        self.servicer = servicer
        self.names = names
        self.probes = probes

    async def update(self, **conditions: bool) -> None:
        """Sets any of warm, redis_up and draining, and health to what they add up to."""
        self.probes.update(**conditions)
        ready = self.probes.ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            await self.servicer.set(name, status)


async def _watch_redis(settings: argparse.Namespace, readiness: HealthState, runtime: Runtime, every_s: float = 1.0):
    """Health follows Redis: NOT_SERVING while it cannot be reached, SERVING again when it answers."""
    probe = connect(settings.redis_url, "no", timeout_s=min(settings.redis_timeout, 1.0))
    reachable = True
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(probe.ping)
            now = True
        except Exception:
            now = False
        if now != reachable:
            reachable = now
            if reachable:
                log.info("Redis is reachable again; serving")
                runtime.nudge()  # a Redis that lost its data lost our registry record too
            else:
                log.warning(
                    "Redis is unreachable at %s; health is NOT_SERVING until it returns", redact(settings.redis_url)
                )
            await readiness.update(redis_up=reachable)


async def _heartbeat(runtime: Runtime, settings: argparse.Namespace, address: str) -> None:
    """Keeps this worker's registry record fresh, and rewrites it soon after its load changes;
    Redis hiccups are logged, not fatal."""
    assert runtime._worker is not None and runtime._changed is not None
    kind, describe = runtime._worker
    registry = WorkerRegistry(runtime.redis, ttl_s=settings.registry_ttl)
    failing = False
    while True:
        runtime._changed.clear()
        try:
            info = describe(address)
            info.worker_id, info.kind, info.address = runtime.worker_id, kind, address
            await asyncio.to_thread(registry.announce, info)
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("worker heartbeat failed: %s", exc)
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime._changed.wait(), settings.registry_ttl / 3)
        await asyncio.sleep(0.05)  # a burst of changes is one write


def main(service: Service, argv: Sequence[str] | None = None) -> int:
    """Entry point of `baton serve <service>` and `python -m services.<service>`."""
    parser = build_parser(f"baton serve {service.name}", service.description, service.settings)
    settings = parser.parse_args(argv)
    setup_logging(settings.log_level, settings.log_format)
    try:
        runtime = make_runtime(settings)
        asyncio.run(serve(service, settings, runtime))
    except (Unavailable, InvalidArgument) as exc:  # Redis away; unreadable certificates or identities
        log.error("%s cannot start: %s", service.name, exc)
        return 1
    return 0
