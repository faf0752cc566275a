"""The one place exceptions become gRPC statuses, calls are admitted, and every RPC is counted and timed
(grpc_metrics: unary calls and streams in histograms of their own, messages each way).

- Baton's errors carry their status code; Redis being away is UNAVAILABLE; anything else is
  INTERNAL and logged as a bug.
- "Ask again" errors (busy, draining, Redis away) carry a `baton-retry` trailer, so a caller
  can tell a worker that answered from a connection that broke.
- Every error also carries google.rpc details in the standard `grpc-status-details-bin`
  trailer, for programs (services.client.errors reads them): an ErrorInfo (reason: the error's
  class, e.g. INVALID_ARGUMENT or BLOB_NOT_FOUND; domain baton.dev; metadata: stage, field,
  retry where known), and on INVALID_ARGUMENT and FAILED_PRECONDITION a BadRequest with one
  field violation (field: BatonError.field_path(), e.g. `stages[draft].denoise.steps`;
  description: what is wrong). Messages and details are bounded (errors.elide), so no status
  outgrows gRPC's metadata limits.
- A request whose bytes protobuf cannot parse is INVALID_ARGUMENT (MALFORMED_REQUEST), not
  gRPC's UNKNOWN, for every method: health and reflection too.
- A client that goes away (a closed Watch, a cancelled call) is CANCELLED, not an error.
- At most `max_concurrency` calls are served at once; health checks and reflection are never
  refused, so a busy service still answers its probes.
- Every call passes the service's gate first (auth.Gate: who is calling, may they), which
  sets auth.CALLER for the servicer; UNAUTHENTICATED and PERMISSION_DENIED come from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import redis
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    RETRY_TRAILER,
    BatonError,
    Busy,
    MalformedRequest,
    elide,
)
from services.common.grpc_metrics import RpcMetrics, rpc_metrics
from services.common.redis_conn import REDIS_DOWN

log = logging.getLogger("baton.rpc")

# Never refused by the concurrency limit: a probe must see a busy service as alive.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# ErrorInfo.domain of every Baton error.
ERROR_DOMAIN = "baton.dev"
# The codes whose details name the field a caller must change.
FIELD_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


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


def rich_status(exc: BaseException, code: grpc.StatusCode, message: str, retry: str) -> status_pb2.Status:
    """The google.rpc.Status sent with `message`: an ErrorInfo, and a BadRequest on FIELD_CODES."""
    stage, fld = (exc.stage, exc.field) if isinstance(exc, BatonError) else ("", "")
    known = {"stage": stage, "field": fld, "retry": retry}
    info = error_details_pb2.ErrorInfo(
        reason=exc.reason if isinstance(exc, BatonError) else code.name,
        domain=ERROR_DOMAIN,
        metadata={k: elide(v, MAX_NAME_BYTES) for k, v in known.items() if v},
    )
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    if code in FIELD_CODES:
        detail = exc.detail if isinstance(exc, BatonError) else message
        path = exc.field_path() if isinstance(exc, BatonError) else ""
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=path, description=elide(detail, MAX_MESSAGE_BYTES)
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


class _Malformed:
    """What a request that protobuf cannot parse deserializes to: the call fails with `message` (_check)."""

    def __init__(self, message: str):
        self.message = message


def _tolerant(method: str, deserializer: Callable | None) -> Callable | None:
    """`deserializer`, returning a _Malformed for bytes it cannot parse: raised from inside gRPC,
    its error would reach the caller as UNKNOWN, past this interceptor."""
    if deserializer is None:
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    takes = message_type.full_name if message_type is not None else "message"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed(
                f"malformed request: {method} takes a serialized {takes}, and protobuf cannot parse the bytes "
                f"sent ({exc})"
            )

    return deserialize


def _check(request):
    if isinstance(request, _Malformed):
        raise MalformedRequest(request.message)
    return request


async def _checked_stream(requests, rpc: RpcMetrics):
    async for request in requests:
        rpc.received.inc()
        yield _check(request)


def _checked(request_or_iterator, streaming: bool, rpc: RpcMetrics):
    if streaming:
        return _checked_stream(request_or_iterator, rpc)
    rpc.received.inc()
    return _check(request_or_iterator)


class _Call:
    """Bookkeeping for one RPC: timing, in-flight gauge, final code, error mapping."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, rpc: RpcMetrics):
        self.method = method
        self.context = context
        self.rpc = rpc
        self.start = time.perf_counter()
        rpc.begin()

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
        message = elide(message, MAX_MESSAGE_BYTES)
        if code is grpc.StatusCode.INTERNAL:
            log.error("unhandled error in %s", self.method, exc_info=exc, extra={"method": self.method})
        else:
            log.info("%s -> %s: %s", self.method, code.name, message, extra={"method": self.method, "code": code.name})
        self.finish(code)
        status = rpc_status.to_status(rich_status(exc, code, message, retry))
        trailers = (*status.trailing_metadata, *(((RETRY_TRAILER, retry),) if retry else ()))
        await self.context.abort(status.code, status.details, trailing_metadata=trailers)

    def finish(self, code: grpc.StatusCode) -> None:
        self.rpc.end(code, time.perf_counter() - self.start)


class _Limit:
    """Calls served at once, refused beyond `limit` (RESOURCE_EXHAUSTED, retry hint busy)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0


Gate = Callable[[str, grpc.aio.ServicerContext], None]


def _wrap_unary_response(
    method: str, behavior: Callable, limit: _Limit | None, streaming: bool, gate: Gate, rpc: RpcMetrics
) -> Callable:
    async def handler(request_or_iterator, context):
        call = _Call(method, context, rpc)
        try:
            gate(method, context)
            _enter(limit, method)
            try:
                response = await behavior(_checked(request_or_iterator, streaming, rpc), context)
            finally:
                _leave(limit)
        except BaseException as exc:
            await call.fail(exc)
        rpc.sent.inc()
        call.finish(grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream_response(
    method: str, behavior: Callable, limit: _Limit | None, streaming: bool, gate: Gate, rpc: RpcMetrics
) -> Callable:
    async def handler(request_or_iterator, context):
        call = _Call(method, context, rpc)
        try:
            gate(method, context)
            _enter(limit, method)
            try:
                result = behavior(_checked(request_or_iterator, streaming, rpc), context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                        rpc.sent.inc()
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

    def __init__(self, max_concurrency: int = 0, gate: Gate | None = None):
        self.limit = _Limit(max_concurrency) if max_concurrency > 0 else None
        self.gate: Gate = gate or (lambda method, context: None)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        limit = None if method.startswith(EXEMPT_PREFIXES) else self.limit
        deserializer = _tolerant(method, handler.request_deserializer)
        if handler.unary_unary:
            rpc = rpc_metrics(method, "unary_unary")
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(method, handler.unary_unary, limit, streaming=False, gate=self.gate, rpc=rpc),
                deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            rpc = rpc_metrics(method, "unary_stream")
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(method, handler.unary_stream, limit, streaming=False, gate=self.gate, rpc=rpc),
                deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            rpc = rpc_metrics(method, "stream_unary")
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(method, handler.stream_unary, limit, streaming=True, gate=self.gate, rpc=rpc),
                deserializer,
                handler.response_serializer,
            )
        rpc = rpc_metrics(method, "stream_stream")
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.stream_stream, limit, streaming=True, gate=self.gate, rpc=rpc),
            deserializer,
            handler.response_serializer,
        )
