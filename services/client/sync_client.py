"""BatonClient: the gateway API from plain Python (and what the CLI uses)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

from services.client.files import save_output, upload_inputs
from services.client.resume import PATIENCE_S, Resume
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.blobs import TENSOR
from services.common.credentials import resolve
from services.common.tensors import tensor_bytes, tensor_from_bytes
from services.common.tls import ClientTLS, open_channel

CHUNK = 1 << 20
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def blob_chunks(header: pb.BlobHandle, data: bytes | memoryview) -> Iterator[gpb.BlobChunk]:
    yield gpb.BlobChunk(header=header)
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        yield gpb.BlobChunk(data=bytes(view[start : start + CHUNK]))


def tensor_header(t: torch.Tensor) -> tuple[pb.BlobHandle, memoryview]:
    raw, dtype, shape = tensor_bytes(t)
    return pb.BlobHandle(media_type=TENSOR, dtype=dtype, shape=shape), raw


class BatonClient:
    """A gateway client. `tls` and `token` default to the BATON_* env vars (services.common.credentials)."""

    def __init__(
        self, address: str, *, timeout: float | None = None, tls: ClientTLS | None = None, token: str | None = None
    ):
        self.channel = open_channel(address, OPTIONS, *resolve(tls, token))
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, spec: jpb.JobSpec, idempotency_key: str = "") -> jpb.Job:
        return self.stub.Submit(gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key), timeout=self.timeout)

    def run(
        self, spec: jpb.JobSpec, idempotency_key: str = "", *, patience_s: float = PATIENCE_S
    ) -> Iterator[jpb.JobEvent]:
        """Submits and streams the job's events until it ends (a cut stream goes on as a watch)."""
        resume = Resume("", patience_s)
        try:
            for event in self.stub.Run(gpb.SubmitRequest(spec=spec, idempotency_key=idempotency_key)):
                resume.seen(event)
                yield event
            return
        except grpc.RpcError as exc:
            if not resume.job_id or resume.retry_after(exc) is None:
                raise
        yield from self.watch(resume.job_id, resume.cursor, patience_s=patience_s)

    def watch(self, job_id: str, after_event_id: str = "", *, patience_s: float = PATIENCE_S) -> Iterator[jpb.JobEvent]:
        """The job's events after `after_event_id` until it ends; reconnects while the gateway is briefly away."""
        resume = Resume(after_event_id, patience_s)
        while True:
            try:
                for event in self.stub.Watch(gpb.WatchRequest(job_id=job_id, after_event_id=resume.cursor)):
                    resume.seen(event)
                    yield event
                return
            except grpc.RpcError as exc:
                wait = resume.retry_after(exc)
                if wait is None:
                    raise
                time.sleep(wait)

    def get(self, job_id: str) -> jpb.Job:
        return self.stub.Get(gpb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def cancel(self, job_id: str, reason: str = "") -> jpb.Job:
        return self.stub.Cancel(gpb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self.timeout)

    def list(self, state: jpb.JobState = jpb.JOB_STATE_UNSPECIFIED, page_size: int = 100) -> Iterator[jpb.Job]:
        token = ""
        while True:
            reply = self.stub.List(gpb.ListJobsRequest(state=state, page_size=page_size, page_token=token))
            yield from reply.jobs
            if not reply.next_page_token:
                return
            token = reply.next_page_token

    # -- blobs -----------------------------------------------------------------------------
    def put_bytes(self, data: bytes, media_type: str) -> pb.BlobHandle:
        return self.stub.PutBlob(blob_chunks(pb.BlobHandle(media_type=media_type), data), timeout=self.timeout)

    def put_tensor(self, t: torch.Tensor) -> pb.BlobHandle:
        header, raw = tensor_header(t)
        return self.stub.PutBlob(blob_chunks(header, raw), timeout=self.timeout)

    def get_bytes(self, handle: pb.BlobHandle) -> tuple[pb.BlobHandle, bytes]:
        header, data = pb.BlobHandle(), bytearray()
        for chunk in self.stub.GetBlob(gpb.GetBlobRequest(blob=handle), timeout=self.timeout):
            if chunk.HasField("header"):
                header = chunk.header
            else:
                data += chunk.data
        return header, bytes(data)

    def get_tensor(self, handle: pb.BlobHandle) -> torch.Tensor:
        header, data = self.get_bytes(handle)
        return tensor_from_bytes(bytearray(data), header.dtype, list(header.shape))

    # -- files -----------------------------------------------------------------------------
    def upload_inputs(self, spec: jpb.JobSpec, base: Path) -> jpb.JobSpec:
        return upload_inputs(spec, base, self.put_bytes, self.put_tensor)

    def download_outputs(self, job: jpb.Job, out_dir: Path) -> builtins.list[Path]:
        """Writes each output of a finished job as DIR/<stage>.<format> (DIR/<stage>-<i>.<format> for
        the images of a batch)."""
        paths = []
        for output in job.outputs:
            tensor = self.get_tensor(output.latents.blob) if output.HasField("latents") else None
            paths += save_output(out_dir, output, lambda handle: self.get_bytes(handle)[1], tensor)
        return paths
