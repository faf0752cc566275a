"""Baton's error types. Each carries the gRPC status code it maps to, so engines raise
domain errors and one interceptor turns them into statuses."""

from __future__ import annotations

# The trailer that carries BatonError.retry to the caller.
RETRY_TRAILER = "baton-retry"


class BatonError(Exception):
    """Base of Baton's errors; `code` is the name of a grpc.StatusCode."""

    code = "INTERNAL"
    # Set on errors that say "not now, ask again" (a busy, draining or cut-off worker): the
    # interceptor sends it as the `baton-retry` trailer, so a caller can tell a worker that
    # answered from a connection that broke, and retry without counting it as a failure.
    retry = ""

    def __init__(self, message: str, *, stage: str = "", field: str = ""):
        self.stage = stage
        self.field = field
        self.detail = message
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = []
        if self.stage:
            where.append(f"stage {self.stage!r}")
        if self.field:
            where.append(f"field {self.field!r}")
        return (": ".join([", ".join(where), self.detail])) if where else self.detail

    def at(self, *, stage: str = "", field: str = "") -> BatonError:
        """Returns the same error located at a stage and/or field (outer context wins when set)."""
        return type(self)(self.detail, stage=stage or self.stage, field=field or self.field)


class InvalidArgument(BatonError):
    code = "INVALID_ARGUMENT"


class NotFound(BatonError):
    code = "NOT_FOUND"


class FailedPrecondition(BatonError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(BatonError):
    code = "RESOURCE_EXHAUSTED"


class Busy(ResourceExhausted):
    """A worker has no room: every slot runs and its queue is full. Try another or later."""

    retry = "busy"


class Unavailable(BatonError):
    code = "UNAVAILABLE"
    retry = "unavailable"


class Draining(Unavailable):
    """A worker is shutting down: it takes nothing new and hands running work on."""

    retry = "draining"


class RedisDown(Unavailable):
    """Redis cannot be reached just now."""

    retry = "redis"


class DataLoss(BatonError):
    code = "DATA_LOSS"


class Cancelled(BatonError):
    code = "CANCELLED"


class DeadlineExceeded(BatonError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(BatonError):
    code = "UNIMPLEMENTED"


class BlobNotFound(NotFound):
    """A blob is missing: never written, expired, or deleted."""


class BlobCorrupt(DataLoss):
    """A blob's bytes do not match its digest or its header."""
