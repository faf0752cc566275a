"""Between files and handles: upload a spec's input files, write a job's outputs to a folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.client.png_info import png_text
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.job_files import input_kind, read_image_file, read_latents_file, write_output
from services.common.raw_tensor import RawTensor

UploadBytes = Callable[[bytes, str], pb.BlobHandle]
UploadTensor = Callable[[RawTensor], pb.BlobHandle]


def file_inputs(spec: jpb.JobSpec, base: Path) -> list[tuple[jpb.InputSpec, Path]]:
    """The spec's inputs given as file paths (relative ones against `base`)."""
    found = []
    for item in spec.inputs:
        if item.WhichOneof("source") == "path":
            path = Path(item.path).expanduser()
            found.append((item, path if path.is_absolute() else base / path))
    return found


@dataclass
class InputFile:
    """A path input read from disk: an image's bytes and media type, or latents and their handle."""

    image: tuple[bytes, str] | None = None
    latents: tuple[RawTensor, pb.LatentHandle] | None = None

    def place(self, item: jpb.InputSpec, uploaded: pb.BlobHandle) -> None:
        """Replaces the input's path by the uploaded blob (with the latents' handle around it)."""
        if self.latents is None:
            item.blob.CopyFrom(uploaded)
            return
        handle = pb.LatentHandle()
        handle.CopyFrom(self.latents[1])
        handle.blob.CopyFrom(uploaded)
        item.latents.CopyFrom(handle)


def read_input(path: Path) -> InputFile:
    if input_kind(path) == "image":
        return InputFile(image=read_image_file(path))
    return InputFile(latents=read_latents_file(path))


def upload_inputs(spec: jpb.JobSpec, base: Path, put_bytes: UploadBytes, put_tensor: UploadTensor) -> jpb.JobSpec:
    """A copy of `spec` whose file inputs (paths relative to `base`) are uploaded handles."""
    out = jpb.JobSpec()
    out.CopyFrom(spec)
    for item, path in file_inputs(out, base):
        found = read_input(path)
        found.place(item, put_bytes(*found.image) if found.image else put_tensor(found.latents[0]))  # type: ignore[index]
    return out


def output_path(out_dir: Path, output: jpb.JobOutput, index: int | None = None) -> Path:
    """DIR/<stage>.<format>; the images of a batch are DIR/<stage>-<index>.<format>."""
    suffix = "" if index is None else f"-{index}"
    return out_dir / f"{output.stage}{suffix}.{output.format.lower()}"


def save_output(
    out_dir: Path,
    job: jpb.Job,
    output: jpb.JobOutput,
    read_image: Callable[[pb.BlobHandle], bytes],
    tensor: RawTensor | None,
) -> list[Path]:
    """Writes one job output: its latents (one file, the whole batch), or each of its images (a PNG
    with the job's parameters in its text chunks, png_info)."""
    if output.HasField("latents"):
        return [write_output(output_path(out_dir, output), latents=tensor, handle=output.latents)]
    images = list(output.images)
    batch = len(images) > 1
    paths = []
    for i, handle in enumerate(images):
        index = i if batch else None
        text = png_text(job, output.stage, index)
        paths.append(write_output(output_path(out_dir, output, index), image_bytes=read_image(handle), png_text=text))
    return paths
