"""The one place exceptions become gRPC statuses, calls are admitted, and every RPC is counted and timed.

- Baton's errors carry their status code; Redis being away is UNAVAILABLE; anything else is
  INTERNAL and logged as a bug.
- "Ask again" errors (busy, draining, Redis away) carry a `baton-retry` trailer, so a caller
  can tell a worker that answered from a connection that broke.
- A client that goes away (a closed Watch, a cancelled call) is CANCELLED, not an error.
- At most `max_concurrency` calls are served at once; health checks and reflection are never
  refused, so a busy service still answers its probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import redis
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import RETRY_TRAILER, BatonError, Busy
from services.common.redis_conn import REDIS_DOWN

log = logging.getLogger("baton.rpc")

REQUESTS = Counter("baton_grpc_requests", "gRPC calls served, by final status code", ["method", "code"])
LATENCY = Histogram(
    "baton_grpc_request_duration_seconds",
    "gRPC call duration",
    ["method"],
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("baton_grpc_in_flight", "gRPC calls being served", ["method"])

# Never refused by the concurrency limit: a probe must see a busy service as alive.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """The status, message and retry hint a client sees for an exception raised by a servicer."""
    if isinstance(exc, BatonError):
        return grpc.StatusCode[exc.code], str(exc), exc.retry
    if isinstance(exc, REDIS_DOWN):
        return grpc.StatusCode.UNAVAILABLE, f"Redis is unreachable: {exc}", "redis"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"Redis is out of memory: {exc}", ""
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of device memory: {exc}", ""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled", ""
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}", ""


class _Call:
    """Bookkeeping for one RPC: timing, in-flight gauge, final code, error mapping."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext):
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        IN_FLIGHT.labels(method).inc()

    async def fail(self, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AbortError):  # the servicer set its own status
            self.finish(self.context.code() or grpc.StatusCode.UNKNOWN)
            raise exc
        if isinstance(exc, asyncio.CancelledError) or self.context.cancelled() or self.context.done():
            # The client went away (or its deadline passed): nobody is left to tell.
            log.debug("%s: the client went away", self.method, extra={"method": self.method})
            self.finish(grpc.StatusCode.CANCELLED)
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            raise asyncio.CancelledError() from exc
        code, message, retry = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("unhandled error in %s", self.method, exc_info=exc, extra={"method": self.method})
        else:
            log.info("%s -> %s: %s", self.method, code.name, message, extra={"method": self.method, "code": code.name})
        self.finish(code)
        await self.context.abort(code, message, trailing_metadata=((RETRY_TRAILER, retry),) if retry else ())

    def finish(self, code: grpc.StatusCode) -> None:
        IN_FLIGHT.labels(self.method).dec()
        LATENCY.labels(self.method).observe(time.perf_counter() - self.start)
        REQUESTS.labels(self.method, code.name).inc()


class _Limit:
    """Calls served at once, refused beyond `limit` (RESOURCE_EXHAUSTED, retry hint busy)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0


def _wrap_unary_response(method: str, behavior: Callable, limit: _Limit | None) -> Callable:
    async def handler(request_or_iterator, context):
        call = _Call(method, context)
        try:
            _enter(limit, method)
            try:
                response = await behavior(request_or_iterator, context)
            finally:
                _leave(limit)
        except BaseException as exc:
            await call.fail(exc)
        call.finish(grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream_response(method: str, behavior: Callable, limit: _Limit | None) -> Callable:
    async def handler(request_or_iterator, context):
        call = _Call(method, context)
        try:
            _enter(limit, method)
            try:
                result = behavior(request_or_iterator, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result
            finally:
                _leave(limit)
        except GeneratorExit:
            # gRPC closes the response stream when the client goes away (a closed Watch): not an error.
            log.debug("%s: the client went away", method, extra={"method": method})
            call.finish(grpc.StatusCode.CANCELLED)
            raise
        except BaseException as exc:
            await call.fail(exc)
        call.finish(grpc.StatusCode.OK)

    return handler


def _enter(limit: _Limit | None, method: str) -> None:
    if limit is None:
        return
    if limit.active >= limit.limit:
        raise Busy(f"this service is serving {limit.active} calls, its limit; retry {method} shortly")
    limit.active += 1


def _leave(limit: _Limit | None) -> None:
    if limit is not None:
        limit.active -= 1


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to status codes (INTERNAL, logged, for anything else), admits calls and records metrics."""

    def __init__(self, max_concurrency: int = 0):
        self.limit = _Limit(max_concurrency) if max_concurrency > 0 else None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        limit = None if method.startswith(EXEMPT_PREFIXES) else self.limit
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(method, handler.unary_unary, limit),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(method, handler.unary_stream, limit),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(method, handler.stream_unary, limit),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.stream_stream, limit),
            handler.request_deserializer,
            handler.response_serializer,
        )
