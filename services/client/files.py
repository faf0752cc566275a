"""Between files and handles: upload a spec's input files, write a job's outputs to a folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.job_files import input_kind, read_image_file, read_latents_file, write_output

UploadBytes = Callable[[bytes, str], pb.BlobHandle]
UploadTensor = Callable[[torch.Tensor], pb.BlobHandle]


def upload_inputs(spec: jpb.JobSpec, base: Path, put_bytes: UploadBytes, put_tensor: UploadTensor) -> jpb.JobSpec:
    """A copy of `spec` whose file inputs (paths relative to `base`) are uploaded handles."""
    out = jpb.JobSpec()
    out.CopyFrom(spec)
    for item in out.inputs:
        if item.WhichOneof("source") != "path":
            continue
        path = Path(item.path).expanduser()
        path = path if path.is_absolute() else base / path
        if input_kind(path) == "image":
            data, media_type = read_image_file(path)
            item.blob.CopyFrom(put_bytes(data, media_type))
        else:
            tensor, handle = read_latents_file(path)
            handle.blob.CopyFrom(put_tensor(tensor))
            item.latents.CopyFrom(handle)
    return out


def output_path(out_dir: Path, output: jpb.JobOutput, index: int | None = None) -> Path:
    """DIR/<stage>.<format>; the images of a batch are DIR/<stage>-<index>.<format>."""
    suffix = "" if index is None else f"-{index}"
    return out_dir / f"{output.stage}{suffix}.{output.format.lower()}"


def save_output(
    out_dir: Path, output: jpb.JobOutput, read_image: Callable[[pb.BlobHandle], bytes], tensor: torch.Tensor | None
) -> list[Path]:
    """Writes one job output: its latents (one file, the whole batch), or each of its images."""
    if output.HasField("latents"):
        return [write_output(output_path(out_dir, output), latents=tensor, handle=output.latents)]
    images = list(output.images)
    batch = len(images) > 1
    return [
        write_output(output_path(out_dir, output, i if batch else None), image_bytes=read_image(handle))
        for i, handle in enumerate(images)
    ]
