"""WorkSlots: how much work a worker takes at once, and the bounded queue in front of it.

A worker runs `capacity` calls at once and keeps up to `max_queued` more waiting, first come
first served; beyond that it refuses with Busy (RESOURCE_EXHAUSTED and a `baton-retry: busy`
trailer), which a caller retries on another worker or later. Refusing beats queueing without
bound: a caller that knows the worker is full can go elsewhere now. Only work RPCs pass
through here; health checks and the registry heartbeat never wait behind them. On drain the
waiting calls are refused at once (Draining, UNAVAILABLE) so they move to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.errors import Busy, Draining


class Ticket:
    """One call's place: waiting in the queue, then holding a slot until released."""

    def __init__(self, slots: WorkSlots):
        self.slots = slots
        self.granted = False
        self.released = False
        self._turn: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def position(self) -> int:
        """1-based place in the queue; 0 once running."""
        try:
            return self.slots._waiting.index(self) + 1
        except ValueError:
            return 0

    async def turn(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` for a slot; True once this call holds one. Raises Draining."""
        if not self.granted:
            try:
                await asyncio.wait_for(asyncio.shield(self._turn), timeout)
            except TimeoutError:
                return False
        return True

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.slots._leave(self)


class WorkSlots:
    def __init__(self, capacity: int, max_queued: int, on_change: Callable[[], None] = lambda: None):
        if capacity < 1 or max_queued < 0:
            raise ValueError("capacity must be at least 1 and max_queued at least 0")
        self.capacity = capacity
        self.max_queued = max_queued
        self.on_change = on_change
        self.running = 0
        self.draining = False
        self._waiting: deque[Ticket] = deque()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def enter(self, what: str = "call") -> Ticket:
        """A ticket that runs now or waits its turn; Busy when every slot and queue place is taken."""
        if self.draining:
            raise Draining(f"this worker is shutting down and takes no new {what}s; another one will")
        ticket = Ticket(self)
        if self.running < self.capacity and not self._waiting:
            self._grant(ticket)
        elif len(self._waiting) < self.max_queued:
            self._waiting.append(ticket)
        else:
            raise Busy(
                f"this worker is busy: {self.running} {what}s running and {len(self._waiting)} waiting "
                f"(capacity {self.capacity}, queue {self.max_queued}); another worker or a later try will take it"
            )
        self.on_change()
        return ticket

    @contextlib.asynccontextmanager
    async def admit(self, what: str = "call") -> AsyncIterator[Ticket]:
        """Holds a slot for the body: waits in the queue first if needed."""
        ticket = self.enter(what)
        try:
            await ticket.turn()
            yield ticket
        finally:
            ticket.release()

    def worker_info(self, device: str, **more) -> wpb.WorkerInfo:
        """A worker's registry record: how busy these slots are, whether they take work, and `more`."""
        return wpb.WorkerInfo(
            in_flight=self.running,
            queued=self.queued,
            capacity=self.capacity,
            max_queued=self.max_queued,
            device=device,
            accepting=not self.draining,
            **more,
        )

    def drain(self) -> None:
        """Takes nothing new; every waiting call is refused with Draining."""
        self.draining = True
        while self._waiting:
            ticket = self._waiting.popleft()
            if not ticket._turn.done():
                ticket._turn.set_exception(Draining("this worker is shutting down; another one will take the call"))
        self.on_change()

    async def close(self, deadline: float) -> None:
        """SIGTERM: waiting calls go elsewhere at once; running ones get until `deadline` (time.monotonic())."""
        self.drain()
        await self.wait_idle(deadline - time.monotonic())

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing runs (within `timeout` seconds)."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        return True

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        self.running += 1
        self._idle.clear()
        if not ticket._turn.done():
            ticket._turn.set_result(None)

    def _leave(self, ticket: Ticket) -> None:
        if ticket.granted:
            self.running -= 1
        elif ticket in self._waiting:
            self._waiting.remove(ticket)
        while self._waiting and self.running < self.capacity:
            self._grant(self._waiting.popleft())
        if self.running == 0:
            self._idle.set()
        self.on_change()
