"""One stage, one worker call: the request each stage kind sends, and what comes back.

A runner makes one attempt on the worker it is given; WorkerPool.call around it decides about
retries. The denoise runner also watches the stream: a worker that sends nothing for longer
than the stall timeout (status events until the first step, step events after it) is
Stalled, and the call is cancelled there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import (
    denoiser_pb2_grpc,
    interposer_pb2,
    interposer_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
)
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.workers import Stalled
from services.gateway.planner import PlannedStage
from services.gateway.tenancy import blob_name

# Called with each step or status event of a denoise window.
Progress = Callable[[dpb.DenoiseEvent], Awaitable[None]]
# Runs processor URIs over handles on a processor worker: (inputs, processors, output key).
ProcessorCall = Callable[[list[pb.LatentHandle], list[str], str], Awaitable[pb.LatentHandle]]


@dataclass
class StageCall:
    """What a stage needs besides its planned request: its resolved inputs and where to put its result."""

    job_id: str
    tenant: str
    stage: PlannedStage
    latents: list[pb.LatentHandle]
    # The image input: one image, or every image of a batch a decode stage made.
    images: list[pb.BlobHandle]
    mask: pb.BlobHandle | None
    timeout: float
    # Runs a denoise stage's latents/output processors (on a processor worker of the pool).
    processors: ProcessorCall | None = None
    # Seconds a denoise stream may stay silent: given whether a step has been seen yet.
    stall_timeout: Callable[[bool], float] = lambda stepped: 30.0

    @property
    def output_key(self) -> str:
        # Keyed by job and stage: a retried stage rewrites the same blob, never a second one; under
        # the job's tenant, whose blobs they are (tenancy.py).
        return blob_name(self.tenant, f"{self.job_id}/{self.stage.name}")


@dataclass
class StageResult:
    latents: pb.LatentHandle | None = None
    # A decode stage's images, one per latent of the batch.
    images: list[pb.BlobHandle] = field(default_factory=list)
    # Steps an earlier attempt had done, restored from its checkpoint.
    resumed_from: int = 0


async def process(channel, inputs: list[pb.LatentHandle], processors, key: str, timeout: float) -> pb.LatentHandle:
    stub = processor_pb2_grpc.ProcessorStub(channel)
    request = processor_pb2.ProcessRequest(inputs=inputs, processors=processors, output_key=key)
    return (await stub.Process(request, timeout=timeout)).latents


async def watched(stream, stall_timeout: Callable[[bool], float]):
    """The stream's events; Stalled (and the call cancelled) when one is late."""
    events = stream.__aiter__()
    stepped = False
    while True:
        limit = stall_timeout(stepped)
        try:
            event = await asyncio.wait_for(events.__anext__(), limit)
        except StopAsyncIteration:
            return
        except TimeoutError:
            stream.cancel()
            waiting = "a step event" if stepped else "the window's first step or a status event"
            raise Stalled(f"the worker sent nothing for {limit:.0f} s while {waiting} was due") from None
        stepped = stepped or event.HasField("step")
        yield event


async def run_denoise(channel, call: StageCall, progress: Progress) -> StageResult:
    body = call.stage.spec.denoise
    request: dpb.DenoiseRequest = _planned(call)
    if call.latents:
        latents = call.latents[0]
        if body.latents_processors:
            assert call.processors is not None
            latents = await call.processors([latents], list(body.latents_processors), f"{call.output_key}/pre")
        request.latents.CopyFrom(latents)
    if call.images:
        request.image.CopyFrom(call.images[0])
    if call.mask is not None:
        request.mask.CopyFrom(call.mask)
    result = None
    stream = denoiser_pb2_grpc.DenoiserStub(channel).Denoise(request, timeout=call.timeout)
    async for event in watched(stream, call.stall_timeout):
        if event.HasField("result"):
            result = event.result
        else:
            await progress(event)
    if result is None:
        raise RuntimeError("the denoiser ended the stream without a result")
    latents = result.latents
    if body.output_processors:
        assert call.processors is not None
        latents = await call.processors([latents], list(body.output_processors), f"{call.output_key}/post")
    return StageResult(latents=latents, resumed_from=result.resumed_from)


async def run_decode(channel, call: StageCall, progress: Progress) -> StageResult:
    request: dpb.DecodeRequest = _planned(call)
    request.latents.CopyFrom(call.latents[0])
    reply = await denoiser_pb2_grpc.DenoiserStub(channel).Decode(request, timeout=call.timeout)
    return StageResult(images=list(reply.images))


async def run_encode(channel, call: StageCall, progress: Progress) -> StageResult:
    assert call.images
    request: dpb.EncodeRequest = _planned(call)
    request.images.extend(call.images)
    reply = await denoiser_pb2_grpc.DenoiserStub(channel).Encode(request, timeout=call.timeout)
    return StageResult(latents=reply.latents)


async def run_interpose(channel, call: StageCall, progress: Progress) -> StageResult:
    request: interposer_pb2.ConvertRequest = _planned(call)
    request.latents.CopyFrom(call.latents[0])
    reply = await interposer_pb2_grpc.InterposerStub(channel).Convert(request, timeout=call.timeout)
    return StageResult(latents=reply.latents)


async def run_process(channel, call: StageCall, progress: Progress) -> StageResult:
    body = call.stage.spec.process
    latents = await process(channel, call.latents, body.processors, call.output_key, call.timeout)
    return StageResult(latents=latents)


def _planned(call: StageCall) -> Any:
    """A copy of the planner's request for the stage, with the stage's output key."""
    planned: Any = call.stage.request
    assert planned is not None, "planned stages carry their request"
    request = type(planned)()
    request.CopyFrom(planned)
    request.output_key = call.output_key
    return request


RUNNERS = {
    "denoise": run_denoise,
    "decode": run_decode,
    "encode": run_encode,
    "interpose": run_interpose,
    "process": run_process,
}
