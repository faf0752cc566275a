"""One stage, one worker call: the request each stage kind sends, and what comes back."""

from __future__ import annotations

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
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.gateway.planner import PlannedStage

Progress = Callable[[dpb.StepEvent], Awaitable[None]]


@dataclass
class StageCall:
    """What a stage needs besides its spec: its resolved inputs and where to put its result."""

    job_id: str
    spec: jpb.JobSpec
    stage: PlannedStage
    latents: list[pb.LatentHandle]
    # The image input: one image, or every image of a batch a decode stage made.
    images: list[pb.BlobHandle]
    mask: pb.BlobHandle | None
    timeout: float
    # A processor worker's channel, for a denoise stage's latents/output processors.
    processors: Any = None

    @property
    def output_key(self) -> str:
        # Keyed by job and stage: a retried stage rewrites the same blob, never a second one.
        return f"{self.job_id}/{self.stage.name}"


@dataclass
class StageResult:
    latents: pb.LatentHandle | None = None
    # A decode stage's images, one per latent of the batch.
    images: list[pb.BlobHandle] = field(default_factory=list)


async def process(channel, call: StageCall, inputs: list[pb.LatentHandle], processors, key: str) -> pb.LatentHandle:
    stub = processor_pb2_grpc.ProcessorStub(channel)
    request = processor_pb2.ProcessRequest(
        inputs=inputs, processors=processors, output_key=key, job_id=call.job_id, stage=call.stage.name
    )
    return (await stub.Process(request, timeout=call.timeout)).latents


async def run_denoise(channel, call: StageCall, progress: Progress) -> StageResult:
    body = call.stage.spec.denoise
    request = dpb.DenoiseRequest(
        model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt, prompt_2=body.prompt_2,
        negative_prompt_2=body.negative_prompt_2, prompt_3=body.prompt_3, negative_prompt_3=body.negative_prompt_3,
        steps=body.steps, scheduler=body.scheduler, max_sequence_length=body.max_sequence_length,
        guidance_rescale=body.guidance_rescale, preview_every=body.preview_every, output_key=call.output_key,
        job_id=call.job_id, stage=call.stage.name, num_images=body.num_images,
    )  # fmt: skip
    for fld in ("guidance_scale", "denoising_start", "denoising_end", "strength"):
        if body.HasField(fld):
            setattr(request, fld, getattr(body, fld))
    if body.HasField("scheduler_config"):
        request.scheduler_config.CopyFrom(body.scheduler_config)
    if body.HasField("seed") or call.spec.HasField("seed"):
        request.seed = body.seed if body.HasField("seed") else call.spec.seed
    if call.latents:
        latents = call.latents[0]
        if body.latents_processors:
            latents = await process(call.processors, call, [latents], body.latents_processors, f"{call.output_key}/pre")
        request.latents.CopyFrom(latents)
    else:
        request.width = body.width or call.spec.width
        request.height = body.height or call.spec.height
    if call.images:
        request.image.CopyFrom(call.images[0])
    if call.mask is not None:
        request.mask.CopyFrom(call.mask)
    result = None
    async for event in denoiser_pb2_grpc.DenoiserStub(channel).Denoise(request, timeout=call.timeout):
        if event.HasField("step"):
            await progress(event.step)
        else:
            result = event.result.latents
    if result is None:
        raise RuntimeError("the denoiser ended the stream without a result")
    if body.output_processors:
        result = await process(call.processors, call, [result], body.output_processors, f"{call.output_key}/post")
    return StageResult(latents=result)


async def run_decode(channel, call: StageCall, progress: Progress) -> StageResult:
    assert call.stage.model is not None
    request = dpb.DecodeRequest(model=call.stage.model.name, latents=call.latents[0], output_key=call.output_key)
    reply = await denoiser_pb2_grpc.DenoiserStub(channel).Decode(request, timeout=call.timeout)
    return StageResult(images=list(reply.images) or [reply.image])


async def run_encode(channel, call: StageCall, progress: Progress) -> StageResult:
    body = call.stage.spec.encode
    assert call.images
    request = dpb.EncodeRequest(model=body.model, images=call.images, output_key=call.output_key)
    if body.HasField("seed"):
        request.seed = body.seed
    reply = await denoiser_pb2_grpc.DenoiserStub(channel).Encode(request, timeout=call.timeout)
    return StageResult(latents=reply.latents)


async def run_interpose(channel, call: StageCall, progress: Progress) -> StageResult:
    body = call.stage.spec.interpose
    request = interposer_pb2.ConvertRequest(
        latents=call.latents[0], target=body.target, method=body.method, source_model=body.source_model,
        target_model=body.target_model, output_key=call.output_key,
    )  # fmt: skip
    reply = await interposer_pb2_grpc.InterposerStub(channel).Convert(request, timeout=call.timeout)
    return StageResult(latents=reply.latents)


async def run_process(channel, call: StageCall, progress: Progress) -> StageResult:
    body = call.stage.spec.process
    return StageResult(latents=await process(channel, call, call.latents, body.processors, call.output_key))


RUNNERS = {
    "denoise": run_denoise,
    "decode": run_decode,
    "encode": run_encode,
    "interpose": run_interpose,
    "process": run_process,
}
