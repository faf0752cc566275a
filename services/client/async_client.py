"""AsyncBatonClient: the gateway API for asyncio programs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import torch

from services.client.resume import PATIENCE_S, Resume
from services.client.sync_client import OPTIONS, blob_chunks, tensor_header
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.credentials import resolve
from services.common.tensors import tensor_from_bytes
from services.common.tls import ClientTLS, open_aio_channel


class AsyncBatonClient:
    """BatonClient for asyncio; `tls` and `token` default to the BATON_* env vars."""

    def __init__(
        self, address: str, *, timeout: float | None = None, tls: ClientTLS | None = None, token: str | None = None
    ):
        self.channel = open_aio_channel(address, OPTIONS, *resolve(tls, token))
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncBatonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, spec: jpb.JobSpec, idempotency_key: str = "") -> jpb.Job:
        request = gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key)
        return await self.stub.Submit(request, timeout=self.timeout)

    async def run(
        self, spec: jpb.JobSpec, idempotency_key: str = "", *, patience_s: float = PATIENCE_S
    ) -> AsyncIterator[jpb.JobEvent]:
        """Submits and streams the job's events until it ends (a cut stream goes on as a watch)."""
        resume = Resume("", patience_s)
        try:
            async for event in self.stub.Run(gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key)):
                resume.seen(event)
                yield event
            return
        except grpc.RpcError as exc:
            if not resume.job_id or resume.retry_after(exc) is None:
                raise
        async for event in self.watch(resume.job_id, resume.cursor, patience_s=patience_s):
            yield event

    async def watch(
        self, job_id: str, after_event_id: str = "", *, patience_s: float = PATIENCE_S
    ) -> AsyncIterator[jpb.JobEvent]:
        """The job's events after `after_event_id` until it ends; reconnects while the gateway is briefly away."""
        resume = Resume(after_event_id, patience_s)
        while True:
            try:
                request = gpb.WatchRequest(job_id=job_id, after_event_id=resume.cursor)
                async for event in self.stub.Watch(request):
                    resume.seen(event)
                    yield event
                return
            except grpc.RpcError as exc:
                wait = resume.retry_after(exc)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def get(self, job_id: str) -> jpb.Job:
        return await self.stub.Get(gpb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    async def cancel(self, job_id: str, reason: str = "") -> jpb.Job:
        return await self.stub.Cancel(gpb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self.timeout)

    async def list(
        self, state: jpb.JobState = jpb.JOB_STATE_UNSPECIFIED, page_size: int = 100
    ) -> AsyncIterator[jpb.Job]:
        token = ""
        while True:
            reply = await self.stub.List(gpb.ListJobsRequest(state=state, page_size=page_size, page_token=token))
            for job in reply.jobs:
                yield job
            if not reply.next_page_token:
                return
            token = reply.next_page_token

    async def put_bytes(self, data: bytes, media_type: str) -> pb.BlobHandle:
        return await self.stub.PutBlob(blob_chunks(pb.BlobHandle(media_type=media_type), data), timeout=self.timeout)

    async def put_tensor(self, t: torch.Tensor) -> pb.BlobHandle:
        header, raw = tensor_header(t)
        return await self.stub.PutBlob(blob_chunks(header, raw), timeout=self.timeout)

    async def get_bytes(self, handle: pb.BlobHandle) -> tuple[pb.BlobHandle, bytes]:
        header, data = pb.BlobHandle(), bytearray()
        async for chunk in self.stub.GetBlob(gpb.GetBlobRequest(blob=handle), timeout=self.timeout):
            if chunk.HasField("header"):
                header = chunk.header
            else:
                data += chunk.data
        return header, bytes(data)

    async def get_tensor(self, handle: pb.BlobHandle) -> torch.Tensor:
        header, data = await self.get_bytes(handle)
        return tensor_from_bytes(bytearray(data), header.dtype, list(header.shape))
