"""Baton's error types. Each carries the gRPC status code it maps to, so engines raise
domain errors and one interceptor turns them into statuses."""

from __future__ import annotations


class BatonError(Exception):
    """Base of Baton's errors; `code` is the name of a grpc.StatusCode."""

    code = "INTERNAL"

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


class Unavailable(BatonError):
    code = "UNAVAILABLE"


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
