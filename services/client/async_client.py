"""AsyncBatonClient: the gateway API for asyncio programs, method for method as BatonClient."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client.files import STATE_MEDIA_TYPE, file_inputs, read_input, save_output
from services.client.resume import PATIENCE_S, Resume, remaining
from services.client.sync_client import OPTIONS, app_tracing, blob_chunks, tensor_header
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.credentials import gateway_address, resolve
from services.common.raw_tensor import RawTensor
from services.common.tls import ClientTLS, open_aio_channel

if TYPE_CHECKING:
    import numpy as np
    import torch

    from services.client.batch_runs import AsyncBatchRun


class AsyncBatonClient:
    """BatonClient for asyncio; `address`, `tls` and `token` default to the same env vars."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ):
        self.address = gateway_address(address)
        tracing = app_tracing()
        interceptors = tracing.aio_client_interceptors() if tracing is not None else None
        self.channel = open_aio_channel(self.address, OPTIONS, *resolve(tls, token), interceptors=interceptors)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncBatonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- readiness -------------------------------------------------------------------------
    async def ready(self, timeout: float = 2.0) -> bool:
        """Whether the gateway answers its health check with SERVING."""
        try:
            stub = health_pb2_grpc.HealthStub(self.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once the gateway is SERVING; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.ready(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the gateway at {self.address} was not SERVING within {timeout:g} s")
            await asyncio.sleep(0.2)

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, spec: jpb.JobSpec, idempotency_key: str = "") -> jpb.Job:
        request = gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key)
        return await self.stub.Submit(request, timeout=self.timeout)

    async def run(
        self,
        spec: jpb.JobSpec,
        idempotency_key: str = "",
        *,
        patience_s: float = PATIENCE_S,
        timeout: float | None = None,
    ) -> AsyncIterator[jpb.JobEvent]:
        """Submits and streams the job's events until it ends (a cut stream goes on as a watch);
        `timeout` bounds the whole stream (DEADLINE_EXCEEDED; the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        resume = Resume("", patience_s)
        try:
            request = gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key)
            async for event in self.stub.Run(request, timeout=remaining(deadline)):
                resume.seen(event)
                yield event
            return
        except grpc.RpcError as exc:
            if not resume.job_id or resume.retry_after(exc, deadline) is None:
                raise
        async for event in self.watch(resume.job_id, resume.cursor, patience_s=patience_s, timeout=remaining(deadline)):
            yield event

    async def watch(
        self,
        job_id: str,
        after_event_id: str = "",
        *,
        patience_s: float = PATIENCE_S,
        timeout: float | None = None,
    ) -> AsyncIterator[jpb.JobEvent]:
        """The job's events after `after_event_id` until it ends; reconnects while the gateway is
        briefly away. `timeout` bounds the whole stream (DEADLINE_EXCEEDED; the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        resume = Resume(after_event_id, patience_s)
        while True:
            try:
                request = gpb.WatchRequest(job_id=job_id, after_event_id=resume.cursor)
                async for event in self.stub.Watch(request, timeout=remaining(deadline)):
                    resume.seen(event)
                    yield event
                return
            except grpc.RpcError as exc:
                wait = resume.retry_after(exc, deadline)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> jpb.Job:
        """Follows the job until it ends and returns its final record."""
        async for _ in self.watch(job_id, timeout=timeout):
            pass
        return await self.get(job_id)

    def batch(
        self,
        spec: jpb.JobSpec | str | Path,
        rows: str | Path | Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 4,
        out_dir: Path | None = None,
        manifest: Path | None = None,
        retry_failed: bool = False,
        cancel_on_interrupt: bool = False,
        **options: Any,
    ) -> AsyncBatchRun:
        """BatonClient.batch for asyncio: `async for result in client.batch(...)`, a task per job in flight."""
        from services.client.batch_runs import run_async

        options.update(concurrency=concurrency, out_dir=out_dir, manifest=manifest, retry_failed=retry_failed)
        return run_async(self, spec, rows, cancel_on_interrupt=cancel_on_interrupt, **options)

    async def get(self, job_id: str) -> jpb.Job:
        return await self.stub.Get(gpb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    async def cancel(self, job_id: str, reason: str = "") -> jpb.Job:
        return await self.stub.Cancel(gpb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self.timeout)

    async def list(
        self, state: jpb.JobState = jpb.JOB_STATE_UNSPECIFIED, page_size: int = 100
    ) -> AsyncIterator[jpb.Job]:
        token = ""
        while True:
            request = gpb.ListJobsRequest(state=state, page_size=page_size, page_token=token)
            reply = await self.stub.List(request, timeout=self.timeout)
            for job in reply.jobs:
                yield job
            if not reply.next_page_token:
                return
            token = reply.next_page_token

    # -- discovery -------------------------------------------------------------------------
    # Unannotated: in this class `list` is the method above, so `list[...]` names no type.
    async def list_models(self):
        """Every model (ClusterModel) the cluster's denoisers hold or can load, with the workers that name it."""
        reply = await self.stub.ListModels(gpb.ListClusterModelsRequest(), timeout=self.timeout)
        return list(reply.models)

    async def list_processors(self):
        """The processors (ProcessorInfo) a processor worker declares, with their arguments."""
        from services.common.api.baton.v1 import processor_pb2 as ppb

        reply = await self.stub.ListProcessors(ppb.ListProcessorsRequest(), timeout=self.timeout)
        return list(reply.processors)

    async def list_schedulers(self):
        """The schedulers (SchedulerInfo) a denoise stage may name, and how each splits across windows."""
        reply = await self.stub.ListSchedulers(gpb.ListSchedulersRequest(), timeout=self.timeout)
        return list(reply.schedulers)

    async def list_workers(self):
        """The registered workers (WorkerInfo); the gateway answers admins only."""
        reply = await self.stub.ListWorkers(gpb.ListWorkersRequest(), timeout=self.timeout)
        return list(reply.workers)

    # -- blobs -----------------------------------------------------------------------------
    async def put_bytes(self, data: bytes, media_type: str) -> pb.BlobHandle:
        return await self.stub.PutBlob(blob_chunks(pb.BlobHandle(media_type=media_type), data), timeout=self.timeout)

    async def put_tensor(self, value: RawTensor | np.ndarray | torch.Tensor) -> pb.BlobHandle:
        """Uploads a RawTensor, numpy array or torch tensor as it is (dtype and shape kept)."""
        header, raw = tensor_header(value)
        return await self.stub.PutBlob(blob_chunks(header, raw), timeout=self.timeout)

    async def get_bytes(self, handle: pb.BlobHandle) -> tuple[pb.BlobHandle, bytes]:
        header, data = pb.BlobHandle(), bytearray()
        async for chunk in self.stub.GetBlob(gpb.GetBlobRequest(blob=handle), timeout=self.timeout):
            if chunk.HasField("header"):
                header = chunk.header
            else:
                data += chunk.data
        return header, bytes(data)

    async def get_raw(self, handle: pb.BlobHandle) -> RawTensor:
        header, data = await self.get_bytes(handle)
        return RawTensor(data, header.dtype, tuple(header.shape))

    async def get_array(self, handle: pb.BlobHandle) -> np.ndarray:
        """A tensor blob as a numpy array (not bfloat16, which numpy lacks)."""
        return (await self.get_raw(handle)).numpy()

    async def get_tensor(self, handle: pb.BlobHandle) -> torch.Tensor:
        """A tensor blob as a torch tensor; needs torch installed."""
        return (await self.get_raw(handle)).torch()

    # -- files -----------------------------------------------------------------------------
    async def upload_inputs(self, spec: jpb.JobSpec, base: Path) -> jpb.JobSpec:
        """A copy of `spec` whose file inputs (relative to `base`) are uploaded blobs."""
        out = jpb.JobSpec()
        out.CopyFrom(spec)
        for item, path in file_inputs(out, base):
            found = await asyncio.to_thread(read_input, path)  # files are read off the event loop
            if found.image is not None:
                found.place(item, await self.put_bytes(*found.image))
            elif found.latents is not None:
                state = await self.put_bytes(found.state, STATE_MEDIA_TYPE) if found.state else None
                found.place(item, await self.put_tensor(found.latents[0]), state)
        return out

    async def download_outputs(self, job: jpb.Job, out_dir: Path) -> builtins.list[Path]:
        """Writes each output of a finished job as BatonClient.download_outputs does."""
        paths: builtins.list[Path] = []
        for output in job.outputs:
            tensor = await self.get_raw(output.latents.blob) if output.HasField("latents") else None
            images = {h.key: (await self.get_bytes(h))[1] for h in output.images}
            carried = output.latents.scheduler.state  # the latents' scheduler state goes into their file
            if carried.key:
                images[carried.key] = (await self.get_bytes(carried))[1]
            paths += await asyncio.to_thread(save_output, Path(out_dir), job, output, _reader(images), tensor)
        return paths


def _reader(images: dict[str, bytes]) -> Callable[[pb.BlobHandle], bytes]:
    """The bytes of blobs already downloaded, by handle (save_output runs off the event loop)."""
    return lambda handle: images[handle.key]
