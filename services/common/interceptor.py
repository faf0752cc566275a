"""The one place exceptions become gRPC statuses, and every RPC is counted and timed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import BatonError

log = logging.getLogger("baton.rpc")

REQUESTS = Counter("baton_grpc_requests", "gRPC calls served, by final status code", ["method", "code"])
LATENCY = Histogram(
    "baton_grpc_request_duration_seconds",
    "gRPC call duration",
    ["method"],
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("baton_grpc_in_flight", "gRPC calls being served", ["method"])


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client sees for an exception raised by a servicer."""
    if isinstance(exc, BatonError):
        return grpc.StatusCode[exc.code], str(exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of device memory: {exc}"
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


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
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("unhandled error in %s", self.method, extra={"method": self.method})
        else:
            log.info("%s -> %s: %s", self.method, code.name, message, extra={"method": self.method, "code": code.name})
        self.finish(code)
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        await self.context.abort(code, message)

    def finish(self, code: grpc.StatusCode) -> None:
        IN_FLIGHT.labels(self.method).dec()
        LATENCY.labels(self.method).observe(time.perf_counter() - self.start)
        REQUESTS.labels(self.method, code.name).inc()


def _wrap_unary_response(method: str, behavior: Callable) -> Callable:
    async def handler(request_or_iterator, context):
        call = _Call(method, context)
        try:
            response = await behavior(request_or_iterator, context)
        except BaseException as exc:
            await call.fail(exc)
        call.finish(grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream_response(method: str, behavior: Callable) -> Callable:
    async def handler(request_or_iterator, context):
        call = _Call(method, context)
        try:
            result = behavior(request_or_iterator, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a coroutine that writes with context.write()
                await result
        except BaseException as exc:
            await call.fail(exc)
        call.finish(grpc.StatusCode.OK)

    return handler


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps Baton's errors to status codes (INTERNAL, logged, for anything else) and records metrics."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(method, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )
