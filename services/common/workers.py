"""WorkerPool: the one way Baton finds and calls workers (gateway stages, the planner's model
catalog, the interposer's VAE round trip, the processor's interposer calls).

Workers come from the registry (or static addresses) with the capacity they advertise. A
call goes to a worker with room: one that holds the model first, then the least loaded,
counting both what the worker last reported and the calls this process has in flight to it.
What happens when a call does not go through depends on who said so:
- the worker answered "not now" (busy, draining, Redis away: a `baton-retry` trailer):
  wait with jittered backoff and try again, on another worker when there is one, for as long
  as the deadline allows; this is never a failure;
- the connection broke or the worker stalled (killed, frozen, partitioned): that worker is
  set aside until it heartbeats again, and the call moves on; after `attempts` such losses
  the call fails with the last cause;
- no worker of the kind is registered: wait up to `worker_wait_s` for one to appear;
- anything else is the call's own answer and is raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.backoff import Backoff
from services.common.errors import RETRY_TRAILER, DeadlineExceeded, InvalidArgument, Unavailable
from services.common.grpc_options import channel_options
from services.common.redis_conn import REDIS_DOWN
from services.common.registry import WorkerRegistry
from services.common.tls import PLAINTEXT, ClientTLS, file_stamp, open_aio_channel
from services.common.tracing import client_interceptors

log = logging.getLogger("baton.workers")
HOLDING = (dpb.MODEL_STATE_READY, dpb.MODEL_STATE_OFFLOADED)
T = TypeVar("T")
# A worker that broke a connection is set aside at least this long (and until a fresher
# heartbeat shows it alive); one that stalled, for STALL_COOLDOWN_S.
DOWN_COOLDOWN_S = 2.0
STALL_COOLDOWN_S = 60.0
# What a static address without a registry record is assumed to take at once.
STATIC_SLOTS = 5
# Here, not in the gateway: the processor calls interposers through a WorkerPool too.
RETRIES = Counter(
    "baton_stage_retries",
    "Worker calls tried again, by the caller's stage kind (else the worker kind) and why",
    ["kind", "reason"],
)
# The retry hints a reason may be; any other hint counts as "unavailable" (bounded label values).
RETRY_HINTS = frozenset({"busy", "draining", "redis", "unavailable"})


class Stalled(Exception):
    """A worker took a call and then sent nothing for longer than the stall timeout."""


class Calls:
    """This process's calls to one worker, to correct the worker's last report of its load.

    The report is a snapshot taken at its heartbeat time: it counts our calls that were running
    then (some have ended since) and none of those we started after it. Other processes' calls
    cannot be corrected; the worker's own queue absorbs that difference.
    """

    KEEP_S = 60.0

    def __init__(self) -> None:
        self.running: dict[int, float] = {}
        self.ended: deque[tuple[float, float]] = deque()
        self._next = 0

    def start(self) -> int:
        self._next += 1
        self.running[self._next] = time.time()
        return self._next

    def end(self, call: int) -> None:
        now = time.time()
        self.ended.append((self.running.pop(call), now))
        while self.ended and self.ended[0][1] < now - self.KEEP_S:
            self.ended.popleft()

    def load(self, reported: int, reported_at: float) -> int:
        """The worker's load now: its report, less our calls that ended since, plus those we started since."""
        ended = sum(1 for began, end in self.ended if began <= reported_at < end)
        started = sum(1 for began in self.running.values() if began > reported_at)
        return max(reported - ended, 0) + started


@dataclass
class Worker:
    address: str
    # None for a static address that has not told us anything.
    info: wpb.WorkerInfo | None = None

    def holds(self, model: str) -> bool:
        return self.info is not None and any(m.name == model and m.state in HOLDING for m in self.info.models)

    def knows(self, model: str) -> bool:
        return self.info is not None and any(m.name == model for m in self.info.models)

    def serves(self, model: str) -> bool:
        """Whether this worker can run a call for `model` (any call, when no model is named)."""
        return not model or self.info is None or self.info.load_on_demand or self.knows(model)

    @property
    def slots(self) -> int:
        """Calls it takes at once: running plus its own queue."""
        if self.info is None or not self.info.capacity:
            return STATIC_SLOTS
        return self.info.capacity + self.info.max_queued

    @property
    def reported(self) -> int:
        return self.info.in_flight + self.info.queued if self.info else 0

    @property
    def reported_at(self) -> float:
        return self.info.heartbeat_at.ToNanoseconds() / 1e9 if self.info else 0.0


def retry_hint(exc: grpc.aio.AioRpcError) -> str:
    """The worker's `baton-retry` trailer: busy, draining, redis, unavailable; empty when the
    failure came from the connection rather than from a worker's answer."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_TRAILER:
            return value if isinstance(value, str) else value.decode()
    return ""


# Verdicts on a failed call.
REFUSED, LOST, FINAL = "refused", "lost", "final"


def verdict(exc: BaseException) -> str:
    if isinstance(exc, Stalled):
        return LOST
    if not isinstance(exc, grpc.aio.AioRpcError):
        return FINAL
    code, hint = exc.code(), retry_hint(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint == "busy":
        return REFUSED
    if code == grpc.StatusCode.UNAVAILABLE:
        return REFUSED if hint else LOST
    if code == grpc.StatusCode.CANCELLED:  # cancelled on the worker's side: it went away
        return LOST
    return FINAL


def retry_reason(exc: BaseException, outcome: str) -> str:
    """Why a call that was not FINAL is tried again: stalled, lost, or the worker's retry hint."""
    if isinstance(exc, Stalled):
        return "stalled"
    if outcome == LOST or not isinstance(exc, grpc.aio.AioRpcError):
        return "lost"
    hint = retry_hint(exc)
    return hint if hint in RETRY_HINTS else "unavailable"


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


# Seconds calls on a channel made with rotated-out credentials may still take.
ROTATION_GRACE_S = 600.0


def read_token(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the cluster token file {path!r}: {exc.strerror}", field="cluster-token-file"
        ) from exc


class WorkerPool:
    def __init__(
        self,
        registry: WorkerRegistry,
        static: dict[str, list[str]],
        max_message_bytes: int,
        *,
        keepalive_s: float = 10.0,
        keepalive_timeout_s: float = 5.0,
        worker_wait_s: float = 300.0,
        attempts: int = 3,
        tls: ClientTLS = PLAINTEXT,
        token_file: str = "",
    ):
        self.registry = registry
        self.tls = tls
        self.token_file = token_file
        # The credentials' files as last read: channels are made anew when they change.
        self._credentials_seen: tuple = ()
        self._checked_at = 0.0
        self.static = static
        self.options = channel_options(max_message_bytes, keepalive_s, keepalive_timeout_s)
        self.worker_wait_s = worker_wait_s
        self.attempts = attempts
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cache: dict[str, tuple[float, list[Worker]]] = {}
        # Calls this process has made to each address (the registry's count lags).
        self.calls: defaultdict[str, Calls] = defaultdict(Calls)
        # address -> (wall time it failed, monotonic time before which it is not used).
        self._down: dict[str, tuple[float, float]] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        self._follow_rotation()
        if address not in self._channels:
            token = read_token(self.token_file) if self.token_file else ""
            # Traced: the trace and the stage's baggage go on to the worker.
            self._channels[address] = open_aio_channel(
                address, self.options, self.tls, token, interceptors=client_interceptors()
            )
        return self._channels[address]

    def _follow_rotation(self, every_s: float = 5.0) -> None:
        """Rotated certificates or token: new calls go on new channels; calls in flight finish on the old."""
        now = time.monotonic()
        if now - self._checked_at < every_s:
            return
        self._checked_at = now
        seen = (self.tls.fingerprint(), file_stamp(self.token_file) if self.token_file else ())
        if seen != self._credentials_seen and self._channels:
            log.info("cluster credentials changed; reconnecting to workers with the new ones")
            for old in self._channels.values():
                asyncio.get_running_loop().create_task(old.close(grace=ROTATION_GRACE_S))
            self._channels.clear()
        self._credentials_seen = seen

    # -- who is there ----------------------------------------------------------------------
    async def workers(self, kind: str, max_age_s: float = 0.2) -> list[Worker]:
        """Registered (accepting) workers of a kind, plus static addresses, at most max_age_s old."""
        cached = self._cache.get(kind)
        if cached and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        try:
            infos = await asyncio.to_thread(self.registry.workers, kind)
        except REDIS_DOWN:
            # Redis is away: go on with what we knew (a caller waits for workers if that was none).
            return cached[1] if cached else []
        found = [Worker(i.address, i) for i in infos if i.accepting]
        seen = {w.address for w in found}
        found += [Worker(a) for a in self.static.get(kind, []) if a not in seen]
        self._cache[kind] = (time.monotonic(), found)
        return found

    async def kinds(self) -> set[str]:
        return {k for k in ("denoiser", "interposer", "processor") if await self.workers(k)}

    def mark_down(self, address: str, cooldown_s: float = DOWN_COOLDOWN_S) -> None:
        """Sets a worker aside after a broken call, until a heartbeat newer than now shows it back."""
        self._down[address] = (time.time(), time.monotonic() + cooldown_s)
        self._cache.clear()

    def is_down(self, worker: Worker) -> bool:
        entry = self._down.get(worker.address)
        if entry is None:
            return False
        failed_at, until = entry
        if time.monotonic() < until:
            return True
        if worker.info is not None and worker.info.heartbeat_at.ToNanoseconds() / 1e9 <= failed_at:
            return True
        del self._down[worker.address]
        return False

    def room(self, worker: Worker) -> int:
        return worker.slots - self.load(worker)

    def load(self, worker: Worker) -> int:
        return self.calls[worker.address].load(worker.reported, worker.reported_at)

    async def live(self, kind: str, model: str = "") -> list[Worker]:
        return [w for w in await self.workers(kind) if w.serves(model) and not self.is_down(w)]

    async def free_slots(self, kind: str, model: str = "") -> int:
        """Calls the live workers of a kind that serve `model` would take now."""
        return sum(max(self.room(w), 0) for w in await self.live(kind, model))

    async def choose(
        self, kind: str, model: str = "", avoid: frozenset[str] = frozenset(), light: bool = False
    ) -> tuple[Worker | None, str]:
        """The worker for a call, or None and why not ("absent" or "busy")."""
        live = await self.live(kind, model)
        if not live:
            return None, "absent"
        open_ = live if light else [w for w in live if self.room(w) > 0]
        if not open_:
            return None, "busy"

        def rank(w: Worker) -> tuple[int, int, float]:
            residency = 0 if w.holds(model) else 1 if w.knows(model) else 2
            load = self.load(w) / max(w.slots, 1)
            return (w.address in avoid, residency, load)

        return min(open_, key=rank), ""

    # -- calling ---------------------------------------------------------------------------
    async def call(
        self,
        kind: str,
        fn: Callable[[grpc.aio.Channel, Worker, float], Awaitable[T]],
        *,
        deadline: float,
        model: str = "",
        what: str = "the call",
        light: bool = False,
        wait_s: float | None = None,
        on_attempt: Callable[[Worker, int], Awaitable[Any]] | None = None,
        on_wait: Callable[[str], Awaitable[Any]] | None = None,
        stage_kind: str = "",
    ) -> T:
        """fn(channel, worker, timeout_s) on a worker of `kind`, retried as the module docstring says.

        `deadline` is a time.time(); `light` calls (model lookups, listings) need no room;
        `wait_s` overrides how long to wait for a worker of the kind to appear. `on_attempt(worker, n)`
        runs before each try: n counts the workers tried that lost it, plus this one (refusals do not count).
        `stage_kind` (denoise, decode, ...) labels the call's retries; the worker kind does without one.
        """
        worker_wait_s = self.worker_wait_s if wait_s is None else wait_s
        backoff = Backoff()
        lost, cause = 0, ""
        absent_since: float | None = None
        avoid: set[str] = set()
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"the deadline passed before a {kind} worker ran {what}" + _last(cause))
            worker, why = await self.choose(kind, model, frozenset(avoid), light)
            if worker is None:
                if why == "absent":
                    absent_since = absent_since or time.monotonic()
                    waited = time.monotonic() - absent_since
                    if waited >= worker_wait_s:
                        gone = f"no {kind} worker is available; waited {waited:.0f} s for one"
                        raise Unavailable(gone + _last(cause))
                    note = f"waiting for a {kind} worker: none is registered"
                else:
                    absent_since = None
                    note = f"waiting for a {kind} worker with room: every one is busy"
                if on_wait is not None:
                    await on_wait(note)
                self._cache.pop(kind, None)
                await asyncio.sleep(min(backoff.next(), max(remaining, 0.0), max(worker_wait_s / 4, 0.05)))
                continue
            absent_since = None
            address = worker.address
            call = None if light else self.calls[address].start()
            try:
                if on_attempt is not None:
                    await on_attempt(worker, lost + 1)
                return await fn(self.channel(address), worker, remaining)
            except (grpc.aio.AioRpcError, Stalled) as exc:
                outcome = verdict(exc)
                if outcome == FINAL:
                    raise
                cause = f"{address}: {describe(exc)}"
                avoid.add(address)
                if outcome == LOST:
                    log.warning(
                        "%s lost on %s (%d of %d workers it may lose): %s",
                        what,
                        address,
                        lost + 1,
                        self.attempts,
                        describe(exc),
                    )
                    lost += 1
                    self.mark_down(address, STALL_COOLDOWN_S if isinstance(exc, Stalled) else DOWN_COOLDOWN_S)
                    if lost >= self.attempts:
                        raise Unavailable(f"{what} was lost on {lost} workers; the last: {cause}") from exc
                elif isinstance(exc, grpc.aio.AioRpcError) and retry_hint(exc) == "draining":
                    log.info("%s handed on by draining %s: %s", what, address, exc.details())
                    self.mark_down(address)
                else:
                    log.debug("%s refused by %s, retrying: %s", what, address, describe(exc))
                RETRIES.labels(stage_kind or kind, retry_reason(exc, outcome)).inc()
                if on_wait is not None:
                    await on_wait(f"retrying: {cause}")
                self._cache.pop(kind, None)
                await asyncio.sleep(min(backoff.next(), max(deadline - time.time(), 0.0)))
            finally:
                if call is not None:
                    self.calls[address].end(call)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _last(cause: str) -> str:
    return f"; the last trouble: {cause}" if cause else ""
