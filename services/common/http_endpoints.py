"""HTTP on the metrics port: `/metrics` for Prometheus, `/livez` and `/readyz` for Kubernetes.

Liveness and readiness answer different questions. `/livez`: is this process worth keeping? The
event loop ticks a timestamp every second; one that has not ticked for 10 s is wedged, and only
a restart helps. `/readyz`: should it get calls now? Only when warm (models preloaded), Redis
reachable and not draining, as gRPC health says. A draining or Redis-less process is alive:
restarting it would lose in-flight work and bring Redis back no sooner.

The server answers from daemon threads, as prometheus_client's own does, so it answers while the
event loop is wedged: that is what `/livez` is there to report. Any other path is 404, so that a
probe pointed at the wrong path fails instead of passing.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import REGISTRY, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

# A loop this late is wedged (a blocking call in a coroutine, a deadlock), not busy: the services
# run their long work (models, windows, Redis calls) in threads.
STALLED_AFTER_S = 10.0
TICK_S = 1.0

REDIS_UP = Gauge("baton_redis_up", "1 while this service reaches Redis, 0 while not")
READY = Gauge("baton_ready", "1 while /readyz answers 200: warm, Redis reachable and not draining")


class ProbeState:
    """What `/livez` and `/readyz` answer: when the event loop last ticked, and whether the service
    is warm, reaches Redis and is draining. It also sets baton_ready and baton_redis_up."""

    def __init__(self) -> None:
        self.warm = False
        self.redis_up = True  # the service reached it before it started serving
        self.draining = False
        self.last_tick = time.monotonic()
        self._publish()

    def update(self, *, warm: bool | None = None, redis_up: bool | None = None, draining: bool | None = None) -> None:
        if warm is not None:
            self.warm = warm
        if redis_up is not None:
            self.redis_up = redis_up
        if draining is not None:
            self.draining = draining
        self._publish()

    def not_ready_because(self) -> str:
        """Why the service should get no calls now; empty when it is ready."""
        if self.draining:
            return "draining"
        if not self.warm:
            return "warming up"
        if not self.redis_up:
            return "Redis unreachable"
        return ""

    @property
    def ready(self) -> bool:
        return not self.not_ready_because()

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < STALLED_AFTER_S

    async def tick(self) -> None:
        """Runs in the event loop while the service runs: `/livez`'s evidence that the loop does."""
        while True:
            self.last_tick = time.monotonic()
            await asyncio.sleep(TICK_S)

    def _publish(self) -> None:
        REDIS_UP.set(1 if self.redis_up else 0)
        READY.set(1 if self.ready else 0)


Answer = tuple[str, list[tuple[str, str]], bytes]


def _text(status: str, body: str) -> Answer:
    return status, [("Content-Type", "text/plain; charset=utf-8")], body.encode()


def make_app(state: ProbeState, registry: Collector = REGISTRY) -> WSGIApplication:
    """The WSGI app: `/metrics` (text or OpenMetrics, as the Accept header asks), `/livez`, `/readyz`;
    GET and HEAD."""
    metrics = make_wsgi_app(registry)

    def answer(environ: WSGIEnvironment) -> Answer:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            got: list = []
            body = b"".join(metrics({**environ, "REQUEST_METHOD": "GET"}, lambda s, h, *_: got.extend((s, h))))
            return got[0], list(got[1]), body
        if path == "/livez":
            if state.alive:
                return _text("200 OK", "ok")
            idle = time.monotonic() - state.last_tick
            return _text("503 Service Unavailable", f"event loop has not run for {idle:.0f} s")
        if path == "/readyz":
            reason = state.not_ready_because()
            return _text("503 Service Unavailable", reason) if reason else _text("200 OK", "ready")
        return _text("404 Not Found", "not found: /metrics, /livez and /readyz are served here")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method in ("GET", "HEAD"):
            status, headers, body = answer(environ)
        else:
            status, headers, body = _text("405 Method Not Allowed", f"{method}: use GET or HEAD")
            headers.append(("Allow", "GET, HEAD"))
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [] if method == "HEAD" else [body]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes and scrapes come every few seconds: no line each."""


def start(host: str, port: int, state: ProbeState, registry: Collector = REGISTRY) -> WSGIServer:
    """Serves the endpoints on host:port (port 0: any free one, `.server_port` says which) from daemon
    threads until `.shutdown()`."""
    host = host.strip("[]") or "0.0.0.0"
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd = make_server(str(sockaddr[0]), port, make_app(state, registry), Server, _QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="baton-http", daemon=True).start()
    return httpd
