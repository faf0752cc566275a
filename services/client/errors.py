"""Reading what a Baton error says to programs: the google.rpc details every Baton status carries.

    try:
        client.submit(spec)
    except grpc.RpcError as exc:
        for violation in field_violations(exc):
            print(violation.field, violation.description)  # stages[draft].denoise.steps: must be ...
        info = error_info(exc)  # info.reason, info.metadata["stage"], info.metadata["field"]

A violation's field is `stages[<name>].<field>` for a field of a named stage, else a path into
the JobSpec or request (`outputs[1].format`, `inputs[0].blob`), "" for the request as a whole;
ErrorInfo's metadata holds the stage and the field apart, and `retry` for "ask again" errors.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from google.rpc.error_details_pb2 import BadRequest
from grpc_status import rpc_status


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the error's trailers; None when it has none (or one that does not
    match the error's code and message, as after a proxy rewrote them). Takes sync and asyncio errors."""
    if not hasattr(error, "trailing_metadata"):  # grpc.aio.AioRpcError has it but is no grpc.Call
        return None
    try:
        return rpc_status.from_call(error)
    except ValueError:
        return None


def field_violations(error: grpc.RpcError) -> list[BadRequest.FieldViolation]:
    """The fields the call was refused for (INVALID_ARGUMENT, FAILED_PRECONDITION); [] for others."""
    status = rich_status(error)
    found: list[BadRequest.FieldViolation] = []
    for detail in status.details if status is not None else ():
        bad = BadRequest()
        if detail.Unpack(bad):
            found.extend(bad.field_violations)
    return found


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The error's reason (e.g. INVALID_ARGUMENT, BLOB_NOT_FOUND, MALFORMED_REQUEST), domain and
    metadata (stage, field, retry where known); None for a status without one."""
    status = rich_status(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None
