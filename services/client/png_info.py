"""What a decoded image says about itself: the job's parameters as PNG text chunks.

Two readers are served. A1111, Civitai and most image browsers read one `parameters` chunk: the
prompt, a `Negative prompt:` line, then `Key: value` pairs; Baton writes the finishing denoise
stage's values there (the stage whose latents the image decodes), plus the whole chain of
stages. Programs read `baton.*` keys: job id, stage, model, prompt, seed, steps, and the job's
spec as JSON (protobuf's JSON mapping, which `baton run` reads back). ComfyUI's own keys
(`prompt`, `workflow`) hold its node graph, so Baton leaves them alone.
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from services.common.api.baton.v1 import jobs_pb2 as jpb


def denoise_chain(spec: jpb.JobSpec, stage: str) -> list[jpb.StageSpec]:
    """The denoise stages whose latents `stage` is made from, first to last (by latents references)."""
    stages = {s.name: s for s in spec.stages}
    chain: list[jpb.StageSpec] = []
    seen: set[str] = set()
    name = stage
    while name in stages and name not in seen:
        seen.add(name)
        node = stages[name]
        kind = node.WhichOneof("kind")
        if kind == "denoise":
            chain.append(node)
        body = getattr(node, kind) if kind else None
        name = getattr(body, "latents", "") if body is not None else ""
    return chain[::-1]


def png_text(job: jpb.Job, stage: str, index: int | None = None) -> dict[str, str]:
    """Text chunks for the image (or image `index` of a batch) that `stage` of `job` made."""
    spec = job.spec
    chain = denoise_chain(spec, stage)
    text = {"baton.job_id": job.id, "baton.stage": stage}
    if index is not None:
        text["baton.batch_index"] = str(index)
    if chain:
        last = chain[-1]
        body = last.denoise
        status = next((s for s in job.stages if s.name == last.name), None)
        seed = body.seed if body.HasField("seed") else spec.seed
        # A batch drawn from a seed list: image i's own seed, as the latents or the spec record it.
        seeds = list(status.latents.seeds) if status is not None else []
        seeds = seeds or list(body.seeds) or ([] if body.HasField("seed") else list(spec.seeds))
        if seeds:
            seed = seeds[index or 0] if (index or 0) < len(seeds) else seeds[0]
        width = status.latents.width if status is not None and status.latents.width else body.width or spec.width
        height = status.latents.height if status is not None and status.latents.height else body.height or spec.height
        text.update(
            {
                "parameters": _a1111(chain, seed, width, height),
                "baton.model": body.model,
                "baton.prompt": body.prompt,
                "baton.negative_prompt": body.negative_prompt,
                "baton.seed": str(seed),
                "baton.steps": str(body.steps),
            }
        )
    text["baton.spec"] = json.dumps(json_format.MessageToDict(spec, preserving_proto_field_name=True))
    return text


def _a1111(chain: list[jpb.StageSpec], seed: int, width: int, height: int) -> str:
    body = chain[-1].denoise
    pairs = [("Steps", str(body.steps))]
    if body.scheduler:
        pairs.append(("Sampler", body.scheduler))
    if body.HasField("guidance_scale"):
        pairs.append(("CFG scale", f"{body.guidance_scale:g}"))
    pairs += [("Seed", str(seed))]
    if width and height:
        pairs.append(("Size", f"{width}x{height}"))
    pairs.append(("Model", body.model))
    if len(chain) > 1:
        pairs.append(("Baton stages", " > ".join(_window(s) for s in chain)))
    lines = [body.prompt]
    if body.negative_prompt:
        lines.append(f"Negative prompt: {body.negative_prompt}")
    lines.append(", ".join(f"{k}: {v.replace(',', ';')}" for k, v in pairs))
    return "\n".join(lines)


def _window(stage: jpb.StageSpec) -> str:
    body = stage.denoise
    start = body.denoising_start if body.HasField("denoising_start") else 0.0
    end = body.denoising_end if body.HasField("denoising_end") else 1.0
    return f"{stage.name} ({body.model} {start:g}-{end:g})"
