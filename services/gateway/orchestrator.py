"""The orchestrator: runs planned jobs, stage by stage as inputs become ready.

A job runs on the gateway that holds its lease in Redis. The lease is renewed while the job
runs; if that gateway dies, another one (or the same one restarted) takes the job over and
runs the stages that had not succeeded: stage outputs are keyed by job and stage, so a re-run
rewrites the same blob. A stage whose worker is UNAVAILABLE is retried on another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.blobs import BlobStore
from services.common.errors import BatonError, Unavailable
from services.common.workers import WorkerPool
from services.gateway.catalog import ModelCatalog
from services.gateway.jobs import TERMINAL, JobStore, now_ts
from services.gateway.planner import WORKER_FOR, Plan, Planner, referenced_models, uses_processors
from services.gateway.stages import RUNNERS, StageCall, StageResult

log = logging.getLogger("baton.gateway")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class StageFailed(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage = stage
        self.reason = reason


class Orchestrator:
    def __init__(
        self,
        jobs: JobStore,
        blobs: BlobStore,
        pool: WorkerPool,
        catalog: ModelCatalog,
        *,
        lease_s: float = 10.0,
        max_attempts: int = 3,
        max_running: int = 64,
        job_timeout_s: float = 3600.0,
    ):
        self.jobs = jobs
        self.blobs = blobs
        self.pool = pool
        self.catalog = catalog
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.job_timeout_s = job_timeout_s
        self.owner = f"gateway-{uuid.uuid4().hex[:12]}"
        self.slots = asyncio.Semaphore(max_running)
        self.running: dict[str, asyncio.Task] = {}
        self._takeover: asyncio.Task | None = None

    # -- planning and submitting -----------------------------------------------------------
    async def plan(self, spec: jpb.JobSpec) -> Plan:
        """The checked DAG for `spec`; InvalidArgument names the stage and field at fault."""
        models = await self.catalog.resolve_all(referenced_models(spec))
        processors = await self.catalog.processors() if uses_processors(spec) else {}
        return Planner(models, await self.pool.kinds(), processors).plan(spec)

    async def submit(self, spec: jpb.JobSpec, idempotency_key: str = "") -> jpb.Job:
        plan = await self.plan(spec)
        job, created = await self.jobs.create(spec, idempotency_key)
        if created:
            for name in plan.order:
                job.stages.add(name=name, kind=plan.stages[name].kind, state=jpb.STAGE_STATE_PENDING)
            await self.jobs.save(job)
            await self._launch(job.id)
        return job

    async def cancel(self, job_id: str, reason: str) -> jpb.Job:
        job = await self.jobs.get(job_id)
        if job.state in TERMINAL:
            return job
        await self.jobs.request_cancel(job_id, reason)
        task = self.running.get(job_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        elif job.state == jpb.JOB_STATE_QUEUED and await self.jobs.acquire(job_id, self.owner, self.lease_s):
            await self._finish(job, jpb.JOB_STATE_CANCELLED, reason or "cancelled by the client")
        return await self.jobs.get(job_id)

    async def _launch(self, job_id: str) -> bool:
        if job_id in self.running or not await self.jobs.acquire(job_id, self.owner, self.lease_s):
            return False
        task = asyncio.create_task(self._run(job_id))
        self.running[job_id] = task
        task.add_done_callback(lambda _: self.running.pop(job_id, None))
        return True

    # -- takeover --------------------------------------------------------------------------
    async def start(self) -> None:
        self._takeover = asyncio.create_task(self._takeover_loop())

    async def stop(self) -> None:
        """Stops running jobs without ending them: their leases lapse and another gateway resumes them."""
        if self._takeover:
            self._takeover.cancel()
        running = dict(self.running)
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        for job_id in running:
            await self.jobs.drop_lease(job_id)

    async def _takeover_loop(self) -> None:
        while True:
            try:
                for job_id in await self.jobs.active():
                    if job_id not in self.running and await self._launch(job_id):
                        log.info("took over job %s", job_id, extra={"job_id": job_id})
            except Exception:
                log.warning("takeover scan failed", exc_info=True)
            await asyncio.sleep(self.lease_s / 2)

    # -- running a job ---------------------------------------------------------------------
    async def _run(self, job_id: str) -> None:
        watchdog = None
        try:
            job = await self.jobs.get(job_id)
            if job.state in TERMINAL:
                await self.jobs.release(job_id)
                return
            run = asyncio.current_task()
            assert run is not None
            watchdog = asyncio.create_task(self._watch(job_id, run))
            async with self.slots:
                await self._execute(job)
        except asyncio.CancelledError:
            reason = await self.jobs.cancel_reason(job_id)
            if reason is not None:
                await self._finish(await self.jobs.get(job_id), jpb.JOB_STATE_CANCELLED, reason)
            raise
        except Exception:
            log.exception("job %s crashed", job_id)
            await self._finish(await self.jobs.get(job_id), jpb.JOB_STATE_FAILED, "internal error in the gateway")
        finally:
            if watchdog:
                watchdog.cancel()

    async def _watch(self, job_id: str, run: asyncio.Task) -> None:
        """Renews the lease and notices a Cancel made on any gateway replica."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            if await self.jobs.cancel_reason(job_id) is not None:
                run.cancel()
                return
            if time.monotonic() - renewed > self.lease_s / 3:
                if not await self.jobs.renew(job_id, self.owner, self.lease_s):
                    log.warning("lost the lease of job %s", job_id)
                    run.cancel()
                    return
                renewed = time.monotonic()

    async def _execute(self, job: jpb.Job) -> None:
        try:
            plan = await self.plan(job.spec)
        except BatonError as exc:
            await self._finish(job, jpb.JOB_STATE_FAILED, f"the job no longer plans: {exc}")
            return
        job.state = jpb.JOB_STATE_RUNNING
        if not job.HasField("started_at"):
            job.started_at.CopyFrom(now_ts())
        await self.jobs.save(job)
        await self.jobs.append(job.id, jpb.JobEvent(job_state=jpb.JOB_STATE_RUNNING))
        timeout = job.spec.timeout_s or self.job_timeout_s
        deadline = job.created_at.ToSeconds() + timeout
        status = {s.name: s for s in job.stages}
        done: dict[str, asyncio.Future] = {name: asyncio.get_running_loop().create_future() for name in plan.order}
        for name, s in status.items():
            if s.state == jpb.STAGE_STATE_SUCCEEDED:  # resumed: keep what already ran
                done[name].set_result(None)
        tasks = [
            asyncio.create_task(self._stage(job, plan, name, status, done, deadline))
            for name in plan.order
            if not done[name].done()
        ]
        try:
            await asyncio.gather(*tasks)
        except StageFailed as exc:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._finish(job, jpb.JOB_STATE_FAILED, str(exc))
            return
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for out in job.spec.outputs:
            s = status[out.stage]
            output = job.outputs.add(stage=out.stage, format=out.format)
            if s.HasField("latents"):
                output.latents.CopyFrom(s.latents)
            if s.HasField("image"):
                output.image.CopyFrom(s.image)
                output.images.extend(s.images)
        await self._finish(job, jpb.JOB_STATE_SUCCEEDED, "")

    async def _stage(self, job, plan: Plan, name: str, status, done, deadline: float) -> None:
        planned = plan.stages[name]
        for dep in planned.deps:
            await done[dep]
        s = status[name]
        s.state, s.error = jpb.STAGE_STATE_RUNNING, ""
        s.started_at.CopyFrom(now_ts())
        call = self._call(job, plan, name, status, deadline)
        if planned.kind == "denoise" and len(call.images) > 1:
            await self._stage_failed(
                job,
                s,
                f"stage {name!r}: field 'denoise.image': {planned.spec.denoise.image!r} holds "
                f"{len(call.images)} images; img2img takes one: encode them (an encode stage) and start from "
                "those latents",
            )
        tried: set[str] = set()
        result: StageResult | None = None
        while result is None:
            s.attempts += 1
            try:
                worker = await self.pool.pick(WORKER_FOR[planned.kind], planned.model.name if planned.model else "",
                                              frozenset(tried))  # fmt: skip
            except Unavailable as exc:
                await self._stage_failed(job, s, str(exc))
            s.worker = worker.address
            await self.jobs.save(job)
            await self.jobs.append(job.id, jpb.JobEvent(stage=s))
            call.timeout = max(deadline - time.time(), 0.001)
            try:
                result = await self._attempt(job, name, s, worker.address, call)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in RETRYABLE and s.attempts < self.max_attempts:
                    log.warning("stage %s: %s unavailable, retrying elsewhere", name, worker.address)
                    tried.add(worker.address)
                    continue
                await self._stage_failed(job, s, f"{exc.code().name}: {exc.details()}")
        expires_ms = job.expires_at.seconds * 1000
        if result.latents is not None:
            await asyncio.to_thread(self._keep, result.latents, expires_ms)
            s.latents.CopyFrom(result.latents)
        if result.images:
            kept = [await asyncio.to_thread(self.blobs.keep_until, image, expires_ms) for image in result.images]
            s.image.CopyFrom(kept[0])
            s.images.extend(kept)
        s.state = jpb.STAGE_STATE_SUCCEEDED
        s.finished_at.CopyFrom(now_ts())
        await self.jobs.save(job)
        await self.jobs.append(job.id, jpb.JobEvent(stage=s))
        done[name].set_result(None)

    async def _attempt(self, job, name: str, s: jpb.StageStatus, address: str, call: StageCall) -> StageResult:
        async def progress(step: dpb.StepEvent) -> None:
            s.step, s.total = step.step, step.total
            event = jpb.StepProgress(stage=name, step=step.step, total=step.total, timestep=step.timestep,
                                     preview_png=step.preview_png)  # fmt: skip
            await self.jobs.append(job.id, jpb.JobEvent(progress=event))

        body = call.stage.spec.denoise
        if call.stage.kind == "denoise" and (body.latents_processors or body.output_processors):
            call.processors = self.pool.channel((await self.pool.pick("processor")).address)
        runner = RUNNERS[call.stage.kind]
        return await runner(self.pool.channel(address), call, progress)

    def _call(self, job, plan: Plan, name: str, status, deadline: float) -> StageCall:
        planned = plan.stages[name]
        inputs = {i.name: i for i in job.spec.inputs}

        def latents_of(ref: str) -> pb.LatentHandle:
            return status[ref].latents if ref in status else inputs[ref].latents

        def images_of(ref: str) -> list[pb.BlobHandle]:
            if ref not in status:
                return [inputs[ref].blob]
            return list(status[ref].images) or [status[ref].image]

        body = getattr(planned.spec, planned.kind)
        refs = [body.latents] if getattr(body, "latents", "") else []
        refs += list(getattr(body, "more_latents", []))
        images = images_of(body.image) if getattr(body, "image", "") else []
        mask = getattr(body, "mask", "")
        return StageCall(
            job_id=job.id, spec=job.spec, stage=planned, latents=[latents_of(r) for r in refs], images=images,
            mask=images_of(mask)[0] if mask else None, timeout=max(deadline - time.time(), 0.001),
        )  # fmt: skip

    def _keep(self, handle: pb.LatentHandle, expires_ms: int) -> None:
        """Stage outputs live as long as their job."""
        handle.blob.CopyFrom(self.blobs.keep_until(handle.blob, expires_ms))
        if handle.scheduler.state.key:
            handle.scheduler.state.CopyFrom(self.blobs.keep_until(handle.scheduler.state, expires_ms))

    async def _stage_failed(self, job, s: jpb.StageStatus, reason: str):
        s.state, s.error = jpb.STAGE_STATE_FAILED, reason
        s.finished_at.CopyFrom(now_ts())
        await self.jobs.save(job)
        await self.jobs.append(job.id, jpb.JobEvent(stage=s))
        raise StageFailed(s.name, reason)

    async def _finish(self, job: jpb.Job, state: jpb.JobState, reason: str) -> None:
        job.state = state
        job.error = reason
        job.finished_at.CopyFrom(now_ts())
        for s in job.stages:
            if s.state in (jpb.STAGE_STATE_PENDING, jpb.STAGE_STATE_RUNNING) and state != jpb.JOB_STATE_SUCCEEDED:
                s.state = jpb.STAGE_STATE_CANCELLED
        await self.jobs.save(job)
        await self.jobs.append(job.id, jpb.JobEvent(job_state=state, error=reason))
        await self.jobs.release(job.id)
        log.info("job %s %s", job.id, jpb.JobState.Name(state), extra={"job_id": job.id, "error": reason})
