"""Baton's error types. Each carries the gRPC status code it maps to, so engines raise
domain errors and one interceptor turns them into statuses."""

from __future__ import annotations

import re

# The trailer that carries BatonError.retry to the caller.
RETRY_TRAILER = "baton-retry"

# Bounds on error texts, in UTF-8 bytes: a status message and its details travel as gRPC
# trailers, which a peer refuses past ~8 KiB (16 KiB hard), so a user's 100 KB stage name must
# not turn a refusal into RESOURCE_EXHAUSTED. Names are stage names and field paths.
MAX_MESSAGE_BYTES = 1024
MAX_NAME_BYTES = 100
ELLIPSIS = "\u2026"


def elide(text: str, limit: int) -> str:
    """`text`, or its head and tail around an ellipsis when it is over `limit` UTF-8 bytes."""
    data = text.encode(errors="replace")
    if len(data) <= limit:
        return text
    keep = max(limit - len(ELLIPSIS.encode()), 0)
    head = data[: (keep + 1) // 2].decode(errors="ignore")  # a character cut in two is dropped
    tail = data[len(data) - keep // 2 :].decode(errors="ignore") if keep > 1 else ""
    return f"{head}{ELLIPSIS}{tail}"


# Fields that name a place in the JobSpec itself, not in the stage an error is about.
JOB_ROOTED = ("stages[", "inputs[", "outputs[")


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

    @property
    def reason(self) -> str:
        """The error's class as UPPER_SNAKE_CASE (BlobNotFound -> BLOB_NOT_FOUND): google.rpc.ErrorInfo's reason."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).upper()

    def field_path(self) -> str:
        """Where the error is, as one path into the JobSpec or request: `stages[<name>].<field>`
        when a stage is set (`stages[draft].denoise.steps`), the field alone when it is already
        rooted at the job (`outputs[1].format`) or no stage is set (`inputs[0].blob`), and ""
        for the request as a whole. Names and fields are elided past MAX_NAME_BYTES."""
        stage, fld = elide(self.stage, MAX_NAME_BYTES), elide(self.field, MAX_NAME_BYTES)
        if not stage or fld.startswith(JOB_ROOTED):
            return fld
        return f"stages[{stage}].{fld}" if fld else f"stages[{stage}]"

    def _compose(self) -> str:
        where = []
        if self.stage:
            where.append(f"stage {elide(self.stage, MAX_NAME_BYTES)!r}")
        if self.field:
            where.append(f"field {elide(self.field, MAX_NAME_BYTES)!r}")
        message = (": ".join([", ".join(where), self.detail])) if where else self.detail
        return elide(message, MAX_MESSAGE_BYTES)

    def at(self, *, stage: str = "", field: str = "") -> BatonError:
        """Returns the same error located at a stage and/or field (outer context wins when set)."""
        return type(self)(self.detail, stage=stage or self.stage, field=field or self.field)


class InvalidArgument(BatonError):
    code = "INVALID_ARGUMENT"


class MalformedRequest(InvalidArgument):
    """The bytes of a request are not the message its method takes (protobuf cannot parse them)."""


class NotFound(BatonError):
    code = "NOT_FOUND"


class Unauthenticated(BatonError):
    code = "UNAUTHENTICATED"


class PermissionDenied(BatonError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(BatonError):
    code = "FAILED_PRECONDITION"


class PickledWeights(FailedPrecondition):
    """A weight file is a pickle (.ckpt, .pt, .bin), which can run code when loaded: Baton loads
    safetensors only, and says how to convert."""


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
