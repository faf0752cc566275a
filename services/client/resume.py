"""Resume: how a client's event stream survives a gateway that is briefly away.

A Watch (or Run) stream cut with UNAVAILABLE (a gateway restarting, a Redis blip, a replica
going away behind a load balancer) is reopened after the last event seen, with jittered
backoff, for up to `patience_s` without an event; nothing is lost or repeated, because events
are resumed by id. Any other error is the caller's to see, and so is a stream's own deadline
(`timeout` of watch and run): a reconnect never waits past it.
"""

from __future__ import annotations

import time

import grpc

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.backoff import Backoff

PATIENCE_S = 60.0


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a time.monotonic() deadline (None: no deadline), at least a little."""
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class Resume:
    def __init__(self, after: str = "", patience_s: float = PATIENCE_S):
        self.cursor = after
        self.patience_s = patience_s
        self.job_id = ""
        self._backoff = Backoff(0.1, 2.0)
        self._since: float | None = None

    def seen(self, event: jpb.JobEvent) -> None:
        self.job_id = event.job_id or self.job_id
        if event.id:
            self.cursor = event.id
        self._since = None
        self._backoff.reset()

    def retry_after(self, exc: BaseException, deadline: float | None = None) -> float | None:
        """Seconds to wait before reopening the stream, or None to give up."""
        if not isinstance(exc, grpc.RpcError) or exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            return None
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since > self.patience_s:
            return None
        wait = self._backoff.next()
        if deadline is not None and now + wait >= deadline:
            return None
        return wait
