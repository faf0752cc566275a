"""The Gateway gRPC servicer: a few lines per RPC over the orchestrator, job store and blobs."""

from __future__ import annotations

import asyncio
import time

from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.auth import ADMIN, caller, requires
from services.common.blobs import OCTET, BlobStore
from services.common.errors import InvalidArgument
from services.common.rules.blobs import (
    UploadCheck,
    check_message_bytes,
    check_store_handle,
)
from services.common.rules.scheduler import SUPPORTED
from services.common.scheduler_caps import capabilities
from services.common.scheduler_options import OPTIONS
from services.gateway.discovery import registered_workers
from services.gateway.jobs import TERMINAL, JobStore
from services.gateway.orchestrator import Orchestrator
from services.gateway.tenancy import check_blob_key, visible

DEFAULT_CHUNK = 1 << 20


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, orchestrator: Orchestrator, jobs: JobStore, blobs: BlobStore, max_blob_bytes: int):
        self.orchestrator = orchestrator
        self.jobs = jobs
        self.blobs = blobs
        self.max_blob_bytes = max_blob_bytes

    async def _job(self, job_id: str) -> jpb.Job:
        """The caller's job; NOT_FOUND for an unknown one or another tenant's alike."""
        return visible(await self.jobs.get(job_id), caller())

    async def Submit(self, request, context):
        return await self.orchestrator.submit(request.spec, request.idempotency_key, _deadline(context), caller())

    async def Run(self, request, context):
        job = await self.orchestrator.submit(request.spec, request.idempotency_key, _deadline(context), caller())
        async for event in self._events(job.id, ""):
            yield event

    async def Watch(self, request, context):
        await self._job(request.job_id)
        async for event in self._events(request.job_id, request.after_event_id):
            yield event

    async def _events(self, job_id: str, after: str):
        """The job's events after `after`, until (and including) the one that ends it; while the
        job is queued, its place whenever that changes."""
        cursor, place = after or "0", -1
        while True:
            batch = await self.jobs.events(job_id, cursor, block_ms=0 if place < 0 else 1000)
            for event in batch:
                cursor = event.id
                yield event
                if event.WhichOneof("event") == "job_state" and event.job_state in TERMINAL:
                    return
            job = await self.jobs.get(job_id)
            if job.state in TERMINAL and not batch and not await self.jobs.events(job_id, cursor, block_ms=0):
                return  # ended before this watch's cursor (e.g. resumed after the last event)
            now = await self.jobs.position(job_id) if job.state == jpb.JOB_STATE_QUEUED else 0
            if now and now != place:
                yield jpb.JobEvent(id=cursor, job_id=job_id, queue=jpb.QueueStatus(position=now))
            place = now

    async def Get(self, request, context):
        return await self.orchestrator.with_position(await self._job(request.job_id))

    async def Cancel(self, request, context):
        await self._job(request.job_id)
        return await self.orchestrator.cancel(request.job_id, request.reason)

    async def List(self, request, context):
        who = caller()
        tenant = None if who.sees_all else who.tenant
        jobs, token = await self.jobs.list_jobs(request.state, request.page_size, request.page_token, tenant)
        jobs = [await self.orchestrator.with_position(j) for j in jobs]
        return gpb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def PutBlob(self, request_iterator, context):
        # Streamed: each chunk goes to Redis as it arrives and the checks run on the way (UploadCheck),
        # so an upload costs the gateway a chunk or two of memory, not its size.
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("the first message must carry the blob's header", field="header")
        header, media_type = first.header, first.header.media_type or OCTET
        upload = UploadCheck(media_type, header.dtype, list(header.shape), header.digest, self.max_blob_bytes)
        writer = self.blobs.open_writer(
            media_type=media_type, dtype=header.dtype, shape=list(header.shape), tenant=caller().tenant
        )
        try:
            async for message in messages:
                if message.HasField("header"):
                    raise InvalidArgument("only the first message carries a header", field="header")
                data = message.data
                upload.feed(data)
                await asyncio.to_thread(writer.write, data)
            # An image's size is recorded (shape [H, W, C]) so that Submit can check it without decoding.
            shape = upload.finish(writer.digest())
            return await asyncio.to_thread(writer.close, shape)
        except BaseException:
            # Shielded: a client that went away cancels this task, and its chunks must still go.
            await asyncio.shield(asyncio.to_thread(writer.abort))
            raise

    async def ListSchedulers(self, request, context):
        infos = []
        for name in SUPPORTED:
            caps = capabilities(name, {})
            infos.append(
                gpb.SchedulerInfo(
                    name=name, split=caps.split, why=caps.why, stochastic=caps.stochastic, options=sorted(OPTIONS[name])
                )
            )
        return gpb.ListSchedulersResponse(schedulers=infos)

    async def ListModels(self, request, context):
        return gpb.ListClusterModelsResponse(models=await self.orchestrator.catalog.models())

    async def ListProcessors(self, request, context):
        processors = await self.orchestrator.catalog.processor_list(_deadline(context) or time.time() + 60)
        return ppb.ListProcessorsResponse(processors=processors)

    @requires(ADMIN)  # worker addresses are the cluster's inside
    async def ListWorkers(self, request, context):
        return gpb.ListWorkersResponse(workers=await registered_workers(self.orchestrator.pool))

    async def GetBlob(self, request, context):
        # Checked before any read: a forged size or chunking must cost a refusal, not a read.
        size = check_message_bytes(request.chunk_bytes, DEFAULT_CHUNK)
        check_store_handle(request.blob, self.blobs, self.max_blob_bytes)
        check_blob_key(request.blob.key, self.blobs, caller(), field="blob.key")
        handle = request.blob if request.blob.digest else await asyncio.to_thread(self.blobs.head, request.blob.key)
        chunks = self.blobs.iter_chunks(handle)  # one chunk in memory at a time; digest checked on the way
        part = await asyncio.to_thread(next, chunks, None)  # a blob that is gone fails before its header
        yield gpb.BlobChunk(header=handle)
        while part is not None:
            view = memoryview(part)
            for start in range(0, len(view), size):
                yield gpb.BlobChunk(data=part if len(view) <= size else bytes(view[start : start + size]))
            part = await asyncio.to_thread(next, chunks, None)


def _deadline(context) -> float | None:
    """The caller's deadline as a time.time(), if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else time.time() + remaining
