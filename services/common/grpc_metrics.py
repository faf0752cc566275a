"""Every service's gRPC calls as Prometheus metrics, in go-grpc-prometheus's grpc_server_* names,
so that stock gRPC dashboards and alerts read them as they are.

Labels: grpc_type (unary, server_stream, client_stream, bidi_stream), grpc_service (the full
name, "baton.v1.Denoiser"), grpc_method ("Denoise"), and grpc_code on calls handled. Unary calls
are timed in grpc_server_handling_seconds, streams in grpc_server_stream_duration_seconds: a
Watch that stays open for minutes is not a slow call, and in one histogram it would hide every
real latency.
"""

from __future__ import annotations

import functools

import grpc
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# No `_created` series anywhere in the process: they double every counter's and histogram's series
# and no dashboard reads them. Process-wide and read at scrape time, so once here is enough: every
# service imports this module through the interceptor.
disable_created_metrics()

LABELS = ("grpc_type", "grpc_service", "grpc_method")

STARTED = Counter("grpc_server_started", "gRPC calls started", LABELS)
HANDLED = Counter("grpc_server_handled", "gRPC calls finished, by status code", (*LABELS, "grpc_code"))
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Duration of unary gRPC calls",
    LABELS,
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STREAM_DURATION = Histogram(
    "grpc_server_stream_duration_seconds",
    "Duration of streaming gRPC calls (a Run or Watch lasts as long as its job)",
    LABELS,
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
)
RECEIVED = Counter("grpc_server_msg_received", "gRPC request messages received", LABELS)
SENT = Counter("grpc_server_msg_sent", "gRPC response messages sent", LABELS)
IN_FLIGHT = Gauge("grpc_server_in_flight", "gRPC calls being served", LABELS)

# A handler's kind, as grpc names it on the RpcMethodHandler, -> grpc_type.
GRPC_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


class RpcMetrics:
    """The metrics of one method, their label sets looked up once: a call then costs a few adds."""

    def __init__(self, full_method: str, grpc_type: str):
        service, _, method = full_method.lstrip("/").partition("/")
        self.labels = (grpc_type, service, method)
        self._started = STARTED.labels(*self.labels)
        self._in_flight = IN_FLIGHT.labels(*self.labels)
        self._duration = (HANDLING if grpc_type == "unary" else STREAM_DURATION).labels(*self.labels)
        self.received = RECEIVED.labels(*self.labels)
        self.sent = SENT.labels(*self.labels)

    def begin(self) -> None:
        self._started.inc()
        self._in_flight.inc()

    def end(self, code: grpc.StatusCode, seconds: float) -> None:
        self._in_flight.dec()
        self._duration.observe(seconds)
        HANDLED.labels(*self.labels, code.name).inc()


@functools.cache
def rpc_metrics(full_method: str, handler_kind: str) -> RpcMetrics:
    """The RpcMetrics of a method served by a `handler_kind` (unary_unary, ...) handler; only
    registered methods get here, so the cache stays as small as the services' APIs."""
    return RpcMetrics(full_method, GRPC_TYPES[handler_kind])
