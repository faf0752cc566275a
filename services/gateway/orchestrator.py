"""The orchestrator: plans and queues jobs, and runs each job it takes, stage by stage as
inputs become ready.

A job runs on the gateway that holds its lease in Redis (the Dispatcher takes it from the
shared queue). The lease is renewed, compare-and-extend, while the job runs; when renewal
fails for good the run stops rather than risk two gateways running one job, and another
gateway (or this one) takes the job over and runs the stages that had not succeeded: stage
outputs are keyed by job and stage, and a denoise window resumes from its last checkpoint.
Redis trouble while a job runs is waited out for as long as the lease surely holds. A Cancel
is recorded in Redis and honoured by whichever gateway runs the job, before each stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import grpc

from services.common import tracing
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.auth import OPEN, Identity
from services.common.backoff import Backoff
from services.common.blobs import BlobStore
from services.common.errors import BatonError, BlobNotFound, RedisDown, Unavailable
from services.common.limits import DEFAULT, Limits
from services.common.redis_conn import REDIS_DOWN
from services.common.rules.blobs import check_store_handle
from services.common.rules.declared import apply_declarations
from services.common.workers import Worker, WorkerPool
from services.gateway import metrics
from services.gateway.catalog import ModelCatalog
from services.gateway.dispatcher import Dispatcher
from services.gateway.jobs import (
    ALREADY_ENDED,
    LEASE_GONE,
    RECORD_LOST,
    RENEWED,
    TERMINAL,
    JobStore,
    deadline_of,
    now_ts,
    spec_fingerprint,
)
from services.gateway.planner import (
    WORKER_FOR,
    Plan,
    Planner,
    referenced_adapters,
    referenced_models,
    uses_processors,
)
from services.gateway.stages import RUNNERS, StageCall, StageResult, process
from services.gateway.step_times import StepTimes
from services.gateway.tenancy import check_blob_key, tenant_of

log = logging.getLogger("baton.gateway")
T = TypeVar("T")
REDIS_TROUBLE: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisDown)
LOST_RECORD = (
    "the job's record was lost from Redis while it ran (was Redis restarted without persistence?); its stage "
    "outputs went with it. Run Redis with appendonly yes (see the README)"
)


class StageFailed(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage!r} failed: {reason}")


class RunStopped(Exception):
    """This gateway must stop running the job: `why` is lost (lease), lost-record or ended."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass
class JobRun:
    """A job this gateway runs: the record it keeps writing, and what its watchdog found."""

    job: jpb.Job
    lease_until: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    # Why the run was stopped from outside: "cancel", "lost", "lost-record", "handoff".
    stop: str = ""
    cancel_reason: str = ""


class Orchestrator:
    def __init__(
        self,
        jobs: JobStore,
        blobs: BlobStore,
        pool: WorkerPool,
        catalog: ModelCatalog,
        *,
        lease_s: float = 10.0,
        max_running: int = 64,
        job_timeout_s: float = 3600.0,
        stall_timeout_s: float = 30.0,
        limits: Limits = DEFAULT,
        max_blob_bytes: int = 256 << 20,
    ):
        self.jobs = jobs
        self.blobs = blobs
        self.limits = limits
        self.max_blob_bytes = max_blob_bytes
        self.pool = pool
        self.catalog = catalog
        self.lease_s = lease_s
        self.job_timeout_s = job_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.owner = f"gateway-{uuid.uuid4().hex[:12]}"
        self.running: dict[str, asyncio.Task] = {}
        self.runs: dict[str, JobRun] = {}
        self.step_times = StepTimes()
        self.dispatcher = Dispatcher(
            jobs,
            pool,
            self._launch,
            self._expire,
            owner=self.owner,
            lease_s=lease_s,
            max_running=max_running,
            job_timeout_s=job_timeout_s,
            running=lambda: len(self.running),
        )

    # -- planning, submitting, cancelling --------------------------------------------------
    async def plan(self, spec: jpb.JobSpec, deadline: float | None = None, caller: Identity | None = None) -> Plan:
        """The checked DAG for `spec`; InvalidArgument names the stage and field at fault. With
        `caller` (at Submit), an input blob outside the caller's tenant is NOT_FOUND. Inputs' declared
        noise levels are written into their handles here, in `spec`, so the job runs what was checked."""
        deadline = deadline or time.time() + 60
        apply_declarations(spec)
        models = await self.catalog.resolve_all(referenced_models(spec), deadline)
        processors = await self.catalog.processors(deadline) if uses_processors(spec) else {}
        stored = await self._stored(spec, caller)
        adapters = await self.catalog.adapters(referenced_adapters(spec), models, deadline)
        return Planner(models, await self.pool.kinds(), processors, self.limits, stored, adapters).plan(spec)

    async def _stored(self, spec: jpb.JobSpec, caller: Identity | None) -> dict[str, pb.BlobHandle]:
        """The full handles of the inputs' blobs (a key-only handle names its blob's latest write),
        each checked to exist: an expired input fails at Submit, not in the middle of the job."""
        stored = {}
        for n, item in enumerate(spec.inputs):
            source = item.WhichOneof("source")
            blob = item.blob if source == "blob" else item.latents.blob if source == "latents" else None
            if blob is not None and blob.key:
                where = f"inputs[{n}].{source}.blob" if source == "latents" else f"inputs[{n}].blob"
                check_store_handle(blob, self.blobs, self.max_blob_bytes, field=where)
                if caller is not None:
                    check_blob_key(blob.key, self.blobs, caller, field=f"{where}.key")
                try:
                    handle = await asyncio.to_thread(self.blobs.resolve, blob)
                    if not await asyncio.to_thread(self.blobs.exists, handle):
                        raise BlobNotFound(f"blob {blob.key} has expired or was deleted")
                except BlobNotFound as exc:
                    raise exc.at(field=f"inputs[{n}].{source}") from exc
                stored[blob.key] = handle
        return stored

    async def submit(
        self, spec: jpb.JobSpec, idempotency_key: str = "", deadline: float | None = None, caller: Identity = OPEN
    ) -> jpb.Job:
        fingerprint = spec_fingerprint(spec) if idempotency_key else ""  # the spec as sent, before its seed
        if not spec.HasField("seed") and not spec.seeds:
            # Recorded in the job, so that every attempt of a stage draws the same noise.
            spec.seed = secrets.randbits(63)
        plan = await self.plan(spec, deadline, caller)
        job = self.jobs.new_job(spec, idempotency_key)
        job.tenant = caller.tenant
        tracing.record_trace(job.info)  # whichever gateway runs the job continues this trace
        for name in plan.order:
            job.stages.add(name=name, kind=plan.stages[name].kind, state=jpb.STAGE_STATE_PENDING)
        job.created_at.CopyFrom(now_ts())
        job, created = await self.jobs.create(job, idempotency_key, deadline_of(job, self.job_timeout_s), fingerprint)
        if created:
            metrics.SUBMITTED.inc()
            self.dispatcher.wake()
        return await self.with_position(job)

    async def with_position(self, job: jpb.Job) -> jpb.Job:
        if job.state == jpb.JOB_STATE_QUEUED:
            job.queue_position = await self.jobs.position(job.id)
        return job

    async def cancel(self, job_id: str, reason: str) -> jpb.Job:
        """Cancels on any replica: recorded first, so whoever runs the job next honours it."""
        reason = reason or "cancelled by the client"
        job = await self.jobs.get(job_id)
        if job.state in TERMINAL:
            return job
        await self.jobs.request_cancel(job_id, reason)
        task = self.running.get(job_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            return await self.jobs.get(job_id)
        if not await self.jobs.acquire(job_id, self.owner, self.lease_s):
            # Another gateway holds it: it sees the cancel within a quarter second.
            for _ in range(8):
                await asyncio.sleep(0.25)
                job = await self.jobs.get(job_id)
                if job.state in TERMINAL:
                    return job
        # Nobody runs it (queued), or its gateway is gone: end it here. A terminal record is
        # never rewritten, so a gateway that wakes up later cannot undo this.
        await self._end_unowned(await self.jobs.get(job_id), jpb.JOB_STATE_CANCELLED, reason)
        return await self.jobs.get(job_id)

    async def _end_unowned(self, job: jpb.Job, state: jpb.JobState, reason: str) -> None:
        _close(job, state, reason)
        if await self.jobs.save(job) == 1:
            metrics.job_ended(job)
            await self.jobs.append(job.id, jpb.JobEvent(job_state=state, error=reason))
            log.info("job %s %s", job.id, jpb.JobState.Name(state), extra={"job_id": job.id, "error": reason})
        await self.jobs.release(job.id, self.owner)

    async def _expire(self, job_id: str, reason: str) -> None:
        """A queued job whose deadline passed (the dispatcher holds its lease)."""
        try:
            job = await self.jobs.get(job_id)
        except BatonError:
            await self.jobs.forget(job_id)
            return
        waited = time.time() - job.created_at.ToNanoseconds() / 1e9
        await self._end_unowned(job, jpb.JOB_STATE_FAILED, f"DEADLINE_EXCEEDED: {reason} ({waited:.0f} s)")

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.dispatcher.start()

    async def drain(self, deadline: float) -> None:
        """SIGTERM: take no new jobs; let running ones finish until shortly before `deadline`."""
        self.dispatcher.paused = True
        while self.running and time.monotonic() < deadline - 2.0:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Hands running jobs on: back into the queue at their place, for another gateway to resume."""
        await self.dispatcher.stop()
        running = dict(self.running)
        for job_id, task in running.items():
            run = self.runs.get(job_id)
            if run is not None and not run.stop:
                run.stop = "handoff"
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)

    def _launch(self, job_id: str) -> None:
        task = asyncio.create_task(self._run(job_id))
        self.running[job_id] = task
        metrics.JOBS_RUNNING.set(len(self.running))

        def done(_: asyncio.Task) -> None:
            self.running.pop(job_id, None)
            metrics.JOBS_RUNNING.set(len(self.running))
            self.runs.pop(job_id, None)
            self.dispatcher.started(job_id)
            self.dispatcher.wake()

        task.add_done_callback(done)

    # -- running a job ---------------------------------------------------------------------
    async def _run(self, job_id: str) -> None:
        run: JobRun | None = None
        watchdog = None
        try:
            job = await self.jobs.get(job_id)
            run = self.runs[job_id] = JobRun(job, time.monotonic() + self.lease_s)
            if job.state in TERMINAL:
                await self.jobs.release(job_id, self.owner)
                return
            task = asyncio.current_task()
            assert task is not None
            watchdog = asyncio.create_task(self._watch(run, task))
            reason = await self.jobs.cancel_reason(job_id)
            if reason is not None:  # cancelled while nobody ran it
                await self._finish(run, jpb.JOB_STATE_CANCELLED, reason)
                return
            with tracing.job_span(job_id, job.info):
                await self._execute(run)
        except asyncio.CancelledError:
            if run is not None:
                await self._stopped(run)
            raise
        except RunStopped as exc:
            assert run is not None
            run.stop = run.stop or exc.why
            await self._stopped(run)
        except REDIS_TROUBLE as exc:
            log.warning("job %s stopped: Redis unreachable for longer than its lease (%s)", job_id, exc)
        except Exception:
            log.exception("job %s crashed", job_id)
            if run is not None:
                await self._finish(run, jpb.JOB_STATE_FAILED, "internal error in the gateway")
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _stopped(self, run: JobRun) -> None:
        """After the run was interrupted: end, report or hand the job on, as the reason says."""
        job_id = run.job.id
        with contextlib.suppress(*REDIS_TROUBLE, RunStopped):
            if run.stop == "cancel":
                await self._finish(run, jpb.JOB_STATE_CANCELLED, run.cancel_reason)
            elif run.stop == "lost-record":
                _close(run.job, jpb.JOB_STATE_FAILED, LOST_RECORD)
                if await self.jobs.save(run.job, must_exist=False) == 1:
                    metrics.job_ended(run.job)
                await self.jobs.append(job_id, jpb.JobEvent(job_state=jpb.JOB_STATE_FAILED, error=LOST_RECORD))
                await self.jobs.release(job_id, self.owner)
                log.warning("job %s failed: its record was lost from Redis", job_id, extra={"job_id": job_id})
            elif run.stop == "handoff":
                submitted = await self.jobs.submitted_at(job_id) or time.time()
                await self.jobs.enqueue(job_id, submitted, deadline_of(run.job, self.job_timeout_s))
                await self.jobs.drop_lease(job_id, self.owner)
                log.info("job %s handed back to the queue", job_id, extra={"job_id": job_id})
            elif run.stop == "lost":
                log.warning("job %s: lost its lease; another gateway runs it", job_id, extra={"job_id": job_id})
            elif run.stop == "ended":  # ended on another replica (a Cancel)
                await self.jobs.drop_lease(job_id, self.owner)

    async def _watch(self, run: JobRun, task: asyncio.Task) -> None:
        """Renews the lease, notices a Cancel made on any replica, and saves step progress (throttled)."""
        job_id = run.job.id
        renewed = flushed = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            try:
                reason = await self.jobs.cancel_reason(job_id)
                if reason is not None:
                    run.stop, run.cancel_reason = "cancel", reason
                    task.cancel()
                    return
                if time.monotonic() - renewed > self.lease_s / 3:
                    sent = time.monotonic()
                    outcome = await self.jobs.renew(job_id, self.owner, self.lease_s)
                    if outcome == LEASE_GONE and not await self.jobs.exists(job_id):
                        run.stop = "lost-record"
                    elif outcome == LEASE_GONE and await self.jobs.acquire(job_id, self.owner, self.lease_s):
                        outcome = RENEWED  # it lapsed (a long Redis outage) and nobody took it
                    if outcome != RENEWED:
                        run.stop = run.stop or "lost"
                        task.cancel()
                        return
                    renewed, run.lease_until = sent, sent + self.lease_s
                if run.dirty and time.monotonic() - flushed > 1.0:
                    flushed = time.monotonic()
                    await self._save(run)
            except REDIS_TROUBLE:
                if time.monotonic() > run.lease_until:
                    run.stop = "lost"
                    task.cancel()
                    return
            except RunStopped as exc:
                run.stop = run.stop or exc.why
                task.cancel()
                return

    async def _durable(self, run: JobRun, fn: Callable[[], Awaitable[T]]) -> T:
        """fn(), with Redis trouble waited out while this gateway's lease surely holds."""
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                return await fn()
            except REDIS_TROUBLE:
                if time.monotonic() > run.lease_until:
                    raise RunStopped("lost") from None
                await asyncio.sleep(backoff.next())

    async def _save(self, run: JobRun) -> None:
        async with run.lock:
            run.dirty = False
            outcome = await self._durable(run, lambda: self.jobs.save(run.job))
        if outcome == RECORD_LOST:
            raise RunStopped("lost-record")
        if outcome == ALREADY_ENDED:
            raise RunStopped("ended")

    async def _event(self, run: JobRun, event: jpb.JobEvent, *, durable: bool = True) -> None:
        if durable:
            await self._durable(run, lambda: self.jobs.append(run.job.id, event))
            return
        with contextlib.suppress(*REDIS_TROUBLE):  # step progress is best effort; the record has the step
            await self.jobs.append(run.job.id, event)

    async def _plan_for_run(self, run: JobRun, deadline: float) -> Plan | None:
        """The plan again (workers may have changed); waits, up to worker-wait, while no worker is
        registered (a takeover right after a restart, before the workers are back)."""
        backoff = Backoff(0.1, 2.0)
        give_up = min(deadline, time.time() + self.pool.worker_wait_s)
        while True:
            try:
                return await self.plan(run.job.spec, deadline)
            except Unavailable:
                if time.time() > give_up:
                    raise
                await asyncio.sleep(backoff.next())
            except BatonError as exc:
                await self._finish(run, jpb.JOB_STATE_FAILED, f"the job no longer plans: {exc}")
                return None

    async def _execute(self, run: JobRun) -> None:
        job = run.job
        deadline = deadline_of(job, self.job_timeout_s)
        try:
            plan = await self._plan_for_run(run, deadline)
        except Unavailable as exc:
            await self._finish(run, jpb.JOB_STATE_FAILED, f"no worker came to run it: {exc}")
            return
        if plan is None:
            return
        job.state = jpb.JOB_STATE_RUNNING
        if not job.HasField("started_at"):
            job.started_at.CopyFrom(now_ts())
            metrics.job_taken(job)
        await self._save(run)
        await self._event(run, jpb.JobEvent(job_state=jpb.JOB_STATE_RUNNING))
        status = {s.name: s for s in job.stages}
        done: dict[str, asyncio.Future] = {name: asyncio.get_running_loop().create_future() for name in plan.order}
        for name, s in status.items():
            if s.state == jpb.STAGE_STATE_SUCCEEDED:  # resumed: keep what already ran
                done[name].set_result(None)
        if all(f.done() for f in done.values()):
            self.dispatcher.started(job.id)
        tasks = [
            # Each stage's task runs in a context that names the stage (worker calls, log lines).
            asyncio.create_task(
                self._stage(run, plan, name, status, done, deadline), context=tracing.stage_context(name)
            )
            for name in plan.order
            if not done[name].done()
        ]
        try:
            await asyncio.gather(*tasks)
        except StageFailed as exc:
            await _cancel_all(tasks)
            await self._finish(run, jpb.JOB_STATE_FAILED, str(exc))
            return
        except BaseException:
            await _cancel_all(tasks)
            raise
        for out in job.spec.outputs:
            s = status[out.stage]
            output = job.outputs.add(stage=out.stage, format=out.format)
            if s.HasField("latents"):
                output.latents.CopyFrom(s.latents)
            output.images.extend(s.images)
        await self._finish(run, jpb.JOB_STATE_SUCCEEDED, "")

    async def _stage(self, run: JobRun, plan: Plan, name: str, status, done, deadline: float) -> None:
        job = run.job
        planned = plan.stages[name]
        for dep in planned.deps:
            await done[dep]
        reason = await self._durable(run, lambda: self.jobs.cancel_reason(job.id))
        if reason is not None:
            run.stop, run.cancel_reason = "cancel", reason
            raise RunStopped("cancel")
        s = status[name]
        s.state, s.error, s.waiting = jpb.STAGE_STATE_RUNNING, "", ""
        s.started_at.CopyFrom(now_ts())
        call = self._call(job, plan, name, status, deadline)
        if planned.kind == "denoise" and len(call.images) > 1:
            await self._stage_failed(
                run,
                s,
                f"stage {name!r}: field 'denoise.image': {planned.spec.denoise.image!r} holds {len(call.images)} "
                "images; img2img takes one: encode them (an encode stage) and start from those latents",
            )
        model = planned.model.name if planned.model else ""
        call.stall_timeout = lambda stepped: self.step_times.stall_timeout(model, stepped, self.stall_timeout_s)
        call.processors = self._processors(run, call, deadline)

        tried = s.attempts  # an earlier gateway's attempts, when this one took the job over

        async def on_attempt(worker: Worker, attempt: int) -> None:
            self.dispatcher.started(job.id)
            s.attempts = tried + attempt
            s.worker, s.waiting = worker.address, ""
            await self._save(run)
            await self._event(run, jpb.JobEvent(stage=s))

        async def on_wait(note: str) -> None:
            if note != s.waiting:
                s.waiting = note
                await self._save(run)
                await self._event(run, jpb.JobEvent(stage=s))

        async def attempt(channel, worker: Worker, timeout: float) -> StageResult:
            call.timeout = timeout
            with tracing.stage_span(job.id, name, planned.kind, model, s.attempts, worker.address):
                return await RUNNERS[planned.kind](channel, call, self._progress(run, s, model))

        try:
            result = await self.pool.call(
                WORKER_FOR[planned.kind],
                attempt,
                deadline=deadline,
                model=model,
                what=f"stage {name!r}",
                on_attempt=on_attempt,
                on_wait=on_wait,
                stage_kind=planned.kind,
            )
            await self._keep_outputs(run, s, result)
        except grpc.aio.AioRpcError as exc:
            await self._stage_failed(run, s, f"{exc.code().name}: {exc.details()}")
        except BatonError as exc:
            await self._stage_failed(run, s, f"{exc.code}: {exc}")
        s.resumed_from = result.resumed_from or s.resumed_from
        s.state, s.waiting = jpb.STAGE_STATE_SUCCEEDED, ""
        s.finished_at.CopyFrom(now_ts())
        log.info("stage %s succeeded on %s", name, s.worker, extra={"attempts": s.attempts})
        metrics.stage_succeeded(planned.kind, model, s)
        await self._save(run)
        await self._event(run, jpb.JobEvent(stage=s))
        done[name].set_result(None)

    async def _keep_outputs(self, run: JobRun, s: jpb.StageStatus, result: StageResult) -> None:
        """Stage outputs live as long as their job."""
        expires_ms = run.job.expires_at.seconds * 1000
        if result.latents is not None:
            latents = result.latents
            await self._durable(run, lambda: asyncio.to_thread(self._keep, latents, expires_ms))
            s.latents.CopyFrom(latents)
        kept = []
        for image in result.images:

            async def keep(image: pb.BlobHandle = image) -> pb.BlobHandle:
                return await asyncio.to_thread(self.blobs.keep_until, image, expires_ms)

            kept.append(await self._durable(run, keep))
        s.images.extend(kept)

    def _progress(self, run: JobRun, s: jpb.StageStatus, model: str):
        last: list[float] = []

        async def progress(event: dpb.DenoiseEvent) -> None:
            if event.HasField("status"):
                status = event.status
                s.resumed_from = status.resumed_from or s.resumed_from
                note = f"queued on {s.worker} (place {status.queue_position})" if status.phase == "queued" else ""
                if note != s.waiting:
                    s.waiting = note
                    run.dirty = True
                return
            step = event.step
            now = time.monotonic()
            if last:
                self.step_times.observe(model, now - last[0])
            last[:] = [now]
            s.step, s.total, s.waiting = step.step, step.total, ""
            run.dirty = True
            update = jpb.StepProgress(
                stage=s.name, step=step.step, total=step.total, timestep=step.timestep, preview_png=step.preview_png
            )
            await self._event(run, jpb.JobEvent(progress=update), durable=False)

        return progress

    def _processors(self, run: JobRun, call: StageCall, deadline: float):
        """Runs a denoise stage's latents/output processors on a processor worker."""

        async def run_processors(inputs: list[pb.LatentHandle], processors: list[str], key: str) -> pb.LatentHandle:
            async def attempt(channel, worker: Worker, timeout: float) -> pb.LatentHandle:
                return await process(channel, inputs, processors, key, timeout)

            return await self.pool.call("processor", attempt, deadline=deadline, what=f"the processors of {key}")

        return run_processors

    def _call(self, job, plan: Plan, name: str, status, deadline: float) -> StageCall:
        planned = plan.stages[name]
        inputs = {i.name: i for i in job.spec.inputs}

        def latents_of(ref: str) -> pb.LatentHandle:
            return status[ref].latents if ref in status else inputs[ref].latents

        def images_of(ref: str) -> list[pb.BlobHandle]:
            if ref not in status:
                return [inputs[ref].blob]
            return list(status[ref].images)

        body = getattr(planned.spec, planned.kind)
        refs = [body.latents] if getattr(body, "latents", "") else []
        refs += list(getattr(body, "more_latents", []))
        images = images_of(body.image) if getattr(body, "image", "") else []
        mask = getattr(body, "mask", "")
        return StageCall(
            job_id=job.id,
            tenant=tenant_of(job),
            stage=planned,
            latents=[latents_of(r) for r in refs],
            images=images,
            mask=images_of(mask)[0] if mask else None,
            timeout=max(deadline - time.time(), 0.001),
        )

    def _keep(self, handle: pb.LatentHandle, expires_ms: int) -> None:
        handle.blob.CopyFrom(self.blobs.keep_until(handle.blob, expires_ms))
        if handle.scheduler.state.key:
            handle.scheduler.state.CopyFrom(self.blobs.keep_until(handle.scheduler.state, expires_ms))

    async def _stage_failed(self, run: JobRun, s: jpb.StageStatus, reason: str) -> NoReturn:
        s.state, s.error, s.waiting = jpb.STAGE_STATE_FAILED, reason, ""
        s.finished_at.CopyFrom(now_ts())
        await self._save(run)
        await self._event(run, jpb.JobEvent(stage=s))
        raise StageFailed(s.name, reason)

    async def _finish(self, run: JobRun, state: jpb.JobState, reason: str) -> None:
        job = run.job
        _close(job, state, reason)
        async with run.lock:
            outcome = await self._durable(run, lambda: self.jobs.save(job))
        if outcome == RECORD_LOST:
            run.stop = "lost-record"
            await self._stopped(run)
            return
        if outcome == 1:
            metrics.job_ended(job)
            await self._event(run, jpb.JobEvent(job_state=state, error=reason))
            log.info("job %s %s", job.id, jpb.JobState.Name(state), extra={"job_id": job.id, "error": reason})
        await self._durable(run, lambda: self.jobs.release(job.id, self.owner))
        self.dispatcher.started(job.id)


def _close(job: jpb.Job, state: jpb.JobState, reason: str) -> None:
    job.state, job.error, job.queue_position = state, reason, 0
    job.finished_at.CopyFrom(now_ts())
    for s in job.stages:
        if s.state in (jpb.STAGE_STATE_PENDING, jpb.STAGE_STATE_RUNNING) and state != jpb.JOB_STATE_SUCCEEDED:
            s.state, s.waiting = jpb.STAGE_STATE_CANCELLED, ""


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
