"""Between files and handles: upload a spec's input files, write a job's outputs to a folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.client.png_info import png_text
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.job_files import input_kind, read_image_file, read_latents_with_state, write_output
from services.common.raw_tensor import RawTensor

UploadBytes = Callable[[bytes, str], pb.BlobHandle]
UploadTensor = Callable[[RawTensor], pb.BlobHandle]
# The media type of a scheduler state blob (the denoiser's save_state: safetensors bytes).
STATE_MEDIA_TYPE = "application/x-safetensors"


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
    """A path input read from disk: an image's bytes and media type, or latents, their handle and
    the scheduler state the file carries (bytes to upload as the handle's scheduler.state)."""

    image: tuple[bytes, str] | None = None
    latents: tuple[RawTensor, pb.LatentHandle] | None = None
    state: bytes | None = None

    def place(self, item: jpb.InputSpec, uploaded: pb.BlobHandle, state: pb.BlobHandle | None = None) -> None:
        """Replaces the input's path by the uploaded blob (with the latents' handle around it, and
        the uploaded scheduler state in it)."""
        if self.latents is None:
            item.blob.CopyFrom(uploaded)
            return
        handle = pb.LatentHandle()
        handle.CopyFrom(self.latents[1])
        handle.blob.CopyFrom(uploaded)
        if state is not None:
            handle.scheduler.state.CopyFrom(state)
        item.latents.CopyFrom(handle)


def read_input(path: Path) -> InputFile:
    if input_kind(path) == "image":
        return InputFile(image=read_image_file(path))
    tensor, handle, state = read_latents_with_state(path)
    return InputFile(latents=(tensor, handle), state=state)


def upload_inputs(spec: jpb.JobSpec, base: Path, put_bytes: UploadBytes, put_tensor: UploadTensor) -> jpb.JobSpec:
    """A copy of `spec` whose file inputs (paths relative to `base`) are uploaded handles."""
    out = jpb.JobSpec()
    out.CopyFrom(spec)
    for item, path in file_inputs(out, base):
        found = read_input(path)
        if found.image:
            found.place(item, put_bytes(*found.image))
        else:
            state = put_bytes(found.state, STATE_MEDIA_TYPE) if found.state else None
            found.place(item, put_tensor(found.latents[0]), state)  # type: ignore[index]
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
    """Writes one job output: its latents (one file, the whole batch, with the scheduler state that
    `read_image` reads, as it reads any blob), or each of its images (a PNG with the job's parameters
    in its text chunks, png_info)."""
    if output.HasField("latents"):
        carried = output.latents.scheduler.state
        state = read_image(carried) if carried.key else None
        path = output_path(out_dir, output)
        return [write_output(path, latents=tensor, handle=output.latents, scheduler_state=state)]
    images = list(output.images)
    batch = len(images) > 1
    paths = []
    for i, handle in enumerate(images):
        index = i if batch else None
        text = png_text(job, output.stage, index)
        paths.append(write_output(output_path(out_dir, output, index), image_bytes=read_image(handle), png_text=text))
    return paths
