"""Dispatcher: how queued jobs reach a gateway, and how no job is left behind.

Every gateway replica takes from one queue in Redis, oldest first, and only when a worker that
can run the job's next stage has room (the capacity workers advertise, minus what this gateway
is already starting): a job waits QUEUED, with a visible place, instead of piling onto busy
workers, and a busy or dead gateway's share is simply taken by the others. A job is taken by
acquiring its lease, so two replicas never run one job.

A periodic scan keeps the books: a job whose gateway died (active, no lease, not queued) goes
back into the queue at its old place; a queued job whose deadline passed fails saying so; a
job whose record expired leaves the active set with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import NotFound
from services.common.redis_conn import REDIS_DOWN
from services.common.workers import WorkerPool
from services.gateway import metrics
from services.gateway.discovery import KINDS
from services.gateway.jobs import TERMINAL, JobStore, deadline_of
from services.gateway.planner import ready_stages

log = logging.getLogger("baton.gateway")
# How many of the oldest queued jobs one pass looks at.
HEAD = 64
# How often the queue and worker gauges are read again: a scrape gets the last reading.
CENSUS_EVERY_S = 2.0
Need = tuple[str, str]


class Dispatcher:
    def __init__(
        self,
        jobs: JobStore,
        pool: WorkerPool,
        launch: Callable[[str], Any],
        expire: Callable[[str, str], Awaitable[None]],
        *,
        owner: str,
        lease_s: float,
        max_running: int,
        job_timeout_s: float,
        running: Callable[[], int],
    ):
        self.jobs = jobs
        self.pool = pool
        self.launch = launch
        self.expire = expire
        self.owner = owner
        self.lease_s = lease_s
        self.max_running = max_running
        self.job_timeout_s = job_timeout_s
        self.running = running
        # Jobs taken but whose first stage has not reached a worker yet, by what they need.
        self.starting: dict[str, Need] = {}
        self.paused = False
        self._wake = asyncio.Event()
        self._needs: dict[str, Need | None] = {}
        self._orphans: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    def wake(self) -> None:
        self._wake.set()

    def started(self, job_id: str) -> None:
        """The job's first stage reached a worker (or the job ended): its room is the pool's to count now."""
        self.starting.pop(job_id, None)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._take_loop()),
            asyncio.create_task(self._scan_loop()),
            asyncio.create_task(self._census_loop()),
        ]

    async def stop(self) -> None:
        self.paused = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- taking queued jobs ----------------------------------------------------------------
    async def _take_loop(self) -> None:
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.25)
            self._wake.clear()
            if self.paused:
                continue
            try:
                await self.take()
                failing = False
            except REDIS_DOWN as exc:
                if not failing:
                    log.warning("cannot read the job queue: %s", exc)
                failing = True
            except Exception:
                log.exception("taking queued jobs failed")

    async def take(self) -> int:
        """Takes the oldest queued jobs there is room for; returns how many."""
        free = self.max_running - self.running()
        if free <= 0:
            return 0
        head = await self.jobs.queue_head(HEAD)
        self._needs = {k: v for k, v in self._needs.items() if k in dict(head)}
        room: dict[Need, int] = {}
        taken = 0
        for job_id, _ in head:
            if job_id in self.starting:
                continue
            need = await self._need(job_id)
            if need is None:
                continue
            if need not in room:
                pending = sum(1 for n in self.starting.values() if n == need)
                room[need] = await self.pool.free_slots(*need) - pending
            if room[need] <= 0:
                continue
            if not await self.jobs.acquire(job_id, self.owner, self.lease_s):
                continue  # another replica took it
            await self.jobs.dequeue(job_id)
            room[need] -= 1
            self.starting[job_id] = need
            self.launch(job_id)
            taken += 1
            if taken >= free:
                break
        return taken

    async def _need(self, job_id: str) -> Need | None:
        """What the job's next stage needs (worker kind, model); None when it cannot run (gone, ended)."""
        if job_id in self._needs:
            return self._needs[job_id]
        need: Need | None = None
        try:
            job = await self.jobs.get(job_id)
        except NotFound:
            await self.jobs.dequeue(job_id)  # the scan logs and forgets it
        else:
            if job.state in TERMINAL:
                await self.jobs.dequeue(job_id)
            else:
                done = {s.name for s in job.stages if s.state == jpb.STAGE_STATE_SUCCEEDED}
                ready = ready_stages(job.spec, done)
                need = ready[0] if ready else ("denoiser", "")
        self._needs[job_id] = need
        return need

    # -- keeping the books -----------------------------------------------------------------
    async def _census_loop(self) -> None:
        """Reads the queue's length and the workers of each kind into the gauges (metrics.census);
        with Redis away the gauges keep their last reading."""
        while True:
            try:
                depth = await self.jobs.queue_length()
                metrics.census(depth, {kind: len(await self.pool.workers(kind)) for kind in KINDS})
            except REDIS_DOWN:
                pass
            except Exception:
                log.exception("reading the queue and workers for the metrics failed")
            await asyncio.sleep(CENSUS_EVERY_S)

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 2)
            try:
                await self.scan()
            except REDIS_DOWN:
                pass  # health says so; the next scan tries again
            except Exception:
                log.exception("job scan failed")

    async def scan(self) -> None:
        now = time.time()
        for job_id in await self.jobs.queued_past(now):
            if await self.jobs.acquire(job_id, self.owner, self.lease_s):
                await self.expire(job_id, "the job's deadline passed while it waited in the queue")
        seen: set[str] = set()
        for job_id in await self.jobs.active():
            if job_id in self.starting:
                continue
            if not await self.jobs.exists(job_id):
                if await self.jobs.forget(job_id):
                    log.warning(
                        "job %s expired before it finished (its record is gone); it leaves the queue",
                        job_id,
                        extra={"job_id": job_id},
                    )
                continue
            if await self.jobs.holder(job_id) is not None or await self.jobs.is_queued(job_id):
                continue
            # Active, nobody runs it, not queued: its gateway died. Twice in a row, so that a job
            # between being taken and its lease being written is not mistaken for one.
            if job_id in self._orphans:
                submitted = await self.jobs.submitted_at(job_id) or now
                job = await self.jobs.get(job_id)
                await self.jobs.enqueue(job_id, submitted, deadline_of(job, self.job_timeout_s))
                log.info("job %s lost its gateway; queued again", job_id, extra={"job_id": job_id})
                self.wake()
            else:
                seen.add(job_id)
        self._orphans = seen
