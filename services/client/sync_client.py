"""BatonClient: the gateway API from plain Python (and what the CLI uses).

Needs no torch: tensors go up and come back as RawTensors (bytes, dtype, shape), numpy arrays,
or torch tensors where torch is installed (`put_tensor` takes any of them; `get_raw`,
`get_array` and `get_tensor` give each back).
"""

from __future__ import annotations

import builtins
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client.files import save_output, upload_inputs
from services.client.resume import PATIENCE_S, Resume, remaining
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.credentials import gateway_address, resolve
from services.common.raw_tensor import TENSOR, RawTensor
from services.common.tls import ClientTLS, open_channel

if TYPE_CHECKING:
    import numpy as np
    import torch

    from services.client.batch_runs import BatchRun

CHUNK = 1 << 20
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
TERMINAL = frozenset({jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED})


def blob_chunks(header: pb.BlobHandle, data: bytes | memoryview) -> Iterator[gpb.BlobChunk]:
    yield gpb.BlobChunk(header=header)
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        yield gpb.BlobChunk(data=bytes(view[start : start + CHUNK]))


def tensor_header(value: Any) -> tuple[pb.BlobHandle, bytes]:
    """The PutBlob header and bytes of a RawTensor, numpy array or torch tensor."""
    raw = RawTensor.of(value)
    return pb.BlobHandle(media_type=TENSOR, dtype=raw.dtype, shape=raw.shape), raw.data


def app_tracing() -> Any:
    """The OpenTelemetry gRPC instrumentation when the app traces (it set a TracerProvider before
    creating the client), to intercept the client's channel so that the app's current span parents
    the gateway's; None otherwise. OpenTelemetry is never imported here unless the app did: the
    CLI starts fast."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None or isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    try:
        from opentelemetry.instrumentation import grpc as instrumentation
    except ImportError:  # the API alone; `pip install 'baton[tracing]'` adds the instrumentation
        return None
    return instrumentation


def is_end(event: jpb.JobEvent) -> bool:
    """Whether `event` is the one that ends its job (a terminal job state)."""
    return event.WhichOneof("event") == "job_state" and event.job_state in TERMINAL


class BatonClient:
    """A gateway client. `address` defaults to BATON_GATEWAY, then 127.0.0.1:50051 (`baton up`);
    `tls` and `token` to the BATON_* env vars (services.common.credentials). `timeout` bounds
    every unary call; streams take their own."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ):
        self.address = gateway_address(address)
        self.channel = open_channel(self.address, OPTIONS, *resolve(tls, token))
        if (tracing := app_tracing()) is not None:
            self.channel = tracing.intercept_channel(self.channel, tracing.client_interceptor())
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- readiness -------------------------------------------------------------------------
    def ready(self, timeout: float = 2.0) -> bool:
        """Whether the gateway answers its health check with SERVING."""
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once the gateway is SERVING; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the gateway at {self.address} was not SERVING within {timeout:g} s")
            time.sleep(0.2)

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, spec: jpb.JobSpec, idempotency_key: str = "") -> jpb.Job:
        return self.stub.Submit(gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key), timeout=self.timeout)

    def run(
        self,
        spec: jpb.JobSpec,
        idempotency_key: str = "",
        *,
        patience_s: float = PATIENCE_S,
        timeout: float | None = None,
    ) -> Iterator[jpb.JobEvent]:
        """Submits and streams the job's events until it ends (a cut stream goes on as a watch);
        `timeout` bounds the whole stream (DEADLINE_EXCEEDED; the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        resume = Resume("", patience_s)
        try:
            request = gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key)
            for event in self.stub.Run(request, timeout=remaining(deadline)):
                resume.seen(event)
                yield event
            return
        except grpc.RpcError as exc:
            if not resume.job_id or resume.retry_after(exc, deadline) is None:
                raise
        yield from self.watch(resume.job_id, resume.cursor, patience_s=patience_s, timeout=remaining(deadline))

    def watch(
        self,
        job_id: str,
        after_event_id: str = "",
        *,
        patience_s: float = PATIENCE_S,
        timeout: float | None = None,
    ) -> Iterator[jpb.JobEvent]:
        """The job's events after `after_event_id` until it ends; reconnects while the gateway is
        briefly away. `timeout` bounds the whole stream (DEADLINE_EXCEEDED; the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        resume = Resume(after_event_id, patience_s)
        while True:
            try:
                request = gpb.WatchRequest(job_id=job_id, after_event_id=resume.cursor)
                for event in self.stub.Watch(request, timeout=remaining(deadline)):
                    resume.seen(event)
                    yield event
                return
            except grpc.RpcError as exc:
                wait = resume.retry_after(exc, deadline)
                if wait is None:
                    raise
                time.sleep(wait)

    def wait(self, job_id: str, *, timeout: float | None = None) -> jpb.Job:
        """Follows the job until it ends and returns its final record."""
        for _ in self.watch(job_id, timeout=timeout):
            pass
        return self.get(job_id)

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
    ) -> BatchRun:
        """Runs `spec` once per row (a .jsonl/.csv file, or mappings) of overrides by dotted path, at
        most `concurrency` jobs at a time; yields a RowResult per row as it ends. Resumable from the
        manifest (default out_dir/manifest.jsonl). Paths: services.client.spec_overrides; keys, the
        manifest and options: services.client.batch."""
        from services.client.batch_runs import run_sync

        options.update(concurrency=concurrency, out_dir=out_dir, manifest=manifest, retry_failed=retry_failed)
        return run_sync(self, spec, rows, cancel_on_interrupt=cancel_on_interrupt, **options)

    def get(self, job_id: str) -> jpb.Job:
        return self.stub.Get(gpb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def cancel(self, job_id: str, reason: str = "") -> jpb.Job:
        return self.stub.Cancel(gpb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self.timeout)

    def list(self, state: jpb.JobState = jpb.JOB_STATE_UNSPECIFIED, page_size: int = 100) -> Iterator[jpb.Job]:
        token = ""
        while True:
            request = gpb.ListJobsRequest(state=state, page_size=page_size, page_token=token)
            reply = self.stub.List(request, timeout=self.timeout)
            yield from reply.jobs
            if not reply.next_page_token:
                return
            token = reply.next_page_token

    # -- discovery -------------------------------------------------------------------------
    def list_models(self) -> builtins.list[gpb.ClusterModel]:
        """Every model the cluster's denoisers hold or can load, with the workers that name it."""
        return list(self.stub.ListModels(gpb.ListClusterModelsRequest(), timeout=self.timeout).models)

    def list_processors(self) -> builtins.list:
        """The processors (ProcessorInfo) a processor worker declares, with their arguments."""
        from services.common.api.baton.v1 import processor_pb2 as ppb

        return list(self.stub.ListProcessors(ppb.ListProcessorsRequest(), timeout=self.timeout).processors)

    def list_schedulers(self) -> builtins.list[gpb.SchedulerInfo]:
        """The schedulers a denoise stage may name, and how each splits across windows."""
        return list(self.stub.ListSchedulers(gpb.ListSchedulersRequest(), timeout=self.timeout).schedulers)

    def list_workers(self) -> builtins.list:
        """The registered workers (WorkerInfo); the gateway answers admins only."""
        return list(self.stub.ListWorkers(gpb.ListWorkersRequest(), timeout=self.timeout).workers)

    # -- blobs -----------------------------------------------------------------------------
    def put_bytes(self, data: bytes, media_type: str) -> pb.BlobHandle:
        return self.stub.PutBlob(blob_chunks(pb.BlobHandle(media_type=media_type), data), timeout=self.timeout)

    def put_tensor(self, value: RawTensor | np.ndarray | torch.Tensor) -> pb.BlobHandle:
        """Uploads a RawTensor, numpy array or torch tensor as it is (dtype and shape kept)."""
        header, raw = tensor_header(value)
        return self.stub.PutBlob(blob_chunks(header, raw), timeout=self.timeout)

    def get_bytes(self, handle: pb.BlobHandle) -> tuple[pb.BlobHandle, bytes]:
        header, data = pb.BlobHandle(), bytearray()
        for chunk in self.stub.GetBlob(gpb.GetBlobRequest(blob=handle), timeout=self.timeout):
            if chunk.HasField("header"):
                header = chunk.header
            else:
                data += chunk.data
        return header, bytes(data)

    def get_raw(self, handle: pb.BlobHandle) -> RawTensor:
        header, data = self.get_bytes(handle)
        return RawTensor(data, header.dtype, tuple(header.shape))

    def get_array(self, handle: pb.BlobHandle) -> np.ndarray:
        """A tensor blob as a numpy array (not bfloat16, which numpy lacks)."""
        return self.get_raw(handle).numpy()

    def get_tensor(self, handle: pb.BlobHandle) -> torch.Tensor:
        """A tensor blob as a torch tensor; needs torch installed."""
        return self.get_raw(handle).torch()

    # -- files -----------------------------------------------------------------------------
    def upload_inputs(self, spec: jpb.JobSpec, base: Path) -> jpb.JobSpec:
        """A copy of `spec` whose file inputs (relative to `base`) are uploaded blobs."""
        return upload_inputs(spec, base, self.put_bytes, self.put_tensor)

    def download_outputs(self, job: jpb.Job, out_dir: Path) -> builtins.list[Path]:
        """Writes each output of a finished job as DIR/<stage>.<format> (DIR/<stage>-<i>.<format> for
        the images of a batch); PNGs carry the job's parameters (services.client.png_info)."""
        paths = []
        for output in job.outputs:
            tensor = self.get_raw(output.latents.blob) if output.HasField("latents") else None
            paths += save_output(Path(out_dir), job, output, lambda handle: self.get_bytes(handle)[1], tensor)
        return paths
