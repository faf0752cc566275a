"""The files a job reads and writes on the client side: job specs, input images and latents,
and outputs. Never unpickles: .pt/.pth files go through torch.load(weights_only=True).

Torch-free: latents are RawTensors (bytes, dtype, shape), so the client and the CLI run without
torch installed; only a .pt/.pth file needs torch, and says so when it is missing.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2
from services.common.errors import InvalidArgument, NotFound
from services.common.raw_tensor import BY_CODE, RawTensor
from services.common.spec_document import parse_spec

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
LATENT_SUFFIXES = (".pt", ".pth", ".safetensors")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
OUTPUT_FORMATS = {
    "png": "image",
    "jpg": "image",
    "jpeg": "image",
    "webp": "image",
    "pt": "latents",
    "pth": "latents",
    "safetensors": "latents",
}
# Where a latents file keeps its tensor, in order of preference.
LATENT_KEYS = ("latents", "latent", "sample", "samples")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SCALING_NAMES = {pb.LATENT_SCALING_MODEL: "model", pb.LATENT_SCALING_RAW: "raw"}
_META_PREFIX = "baton."  # safetensors metadata keys; a .pt file keeps the same fields under "baton"


def load_spec(path: Path | str) -> jobs_pb2.JobSpec:
    """Reads a job spec file: YAML or JSON in protobuf's JSON mapping of baton.v1.JobSpec.

    Errors name the file, line and column, the stage and the snake_case field (spec_document).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SPEC_SUFFIXES:
        raise InvalidArgument(f"{path}: a job spec is a {', '.join(SPEC_SUFFIXES)} file")
    text = _read_bytes(path).decode("utf-8", errors="replace")
    if not text.strip():
        raise InvalidArgument(f"{path}: the job spec is empty")
    return parse_spec(text, str(path), "json" if suffix == ".json" else "yaml")


def spec_to_yaml(spec: jobs_pb2.JobSpec) -> str:
    """A JobSpec as the YAML that load_spec reads back."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def input_kind(path: Path | str) -> str:
    """Whether a file is an "image" or a "latents" input, by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_TYPES:
        return "image"
    if suffix in LATENT_SUFFIXES:
        return "latents"
    accepted = ", ".join([*IMAGE_TYPES, *LATENT_SUFFIXES])
    raise InvalidArgument(f"{path}: unknown input file type {suffix or '(none)'!r}; accepted: {accepted}")


def read_image_file(path: Path | str) -> tuple[bytes, str]:
    """The bytes of a PNG, JPEG or WebP file and their media type, once PIL has checked them."""
    path = Path(path)
    if input_kind(path) != "image":
        raise InvalidArgument(f"{path}: expected an image file ({', '.join(IMAGE_TYPES)})")
    from PIL import Image

    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            found = img.format
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{path}: not a readable image: {e}") from e
    # The media type follows the content, so a mislabelled file is still sent as what it is.
    media_type = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(found or "")
    if media_type is None:
        raise InvalidArgument(f"{path}: is a {found} image; accepted: PNG, JPEG, WebP")
    return data, media_type


def read_latents_file(path: Path | str) -> tuple[RawTensor, pb.LatentHandle]:
    """Latents [1, C, H, W] from a .pt/.pth/.safetensors file and a LatentHandle (blob unset).

    Baton metadata written by write_output is restored. A file without it is taken as finished
    latents: space empty (the caller must say), scaling MODEL, noise.fraction 1.0.
    """
    path = Path(path)
    if input_kind(path) != "latents":
        raise InvalidArgument(f"{path}: expected a latents file ({', '.join(LATENT_SUFFIXES)})")
    if not path.is_file():
        raise NotFound(f"{path}: no such file")
    meta: Mapping[str, Any]
    tensor, meta = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_torch(path)
    if not tensor.is_float:
        raise InvalidArgument(
            f"{path}: latents are {tensor.dtype_name}; expected float32, float16, bfloat16 or float64"
        )
    if len(tensor.shape) == 3:
        tensor = tensor.reshape((1, *tensor.shape))
    elif len(tensor.shape) != 4:
        raise InvalidArgument(f"{path}: latents have shape {list(tensor.shape)}; expected [C, H, W] or [B, C, H, W]")
    return tensor, _handle_from_meta(meta, path)


def write_output(
    path: Path | str,
    *,
    image_bytes: bytes | None = None,
    latents: Any = None,
    handle: pb.LatentHandle | None = None,
    png_text: Mapping[str, str] | None = None,
) -> Path:
    """Writes a stage's image or latents (a RawTensor, numpy array or torch tensor) in the format
    named by the file's extension; a PNG also gets `png_text` as text chunks."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise InvalidArgument(f"{path}: unknown output format {fmt!r}; accepted: {', '.join(OUTPUT_FORMATS)}")
    if (image_bytes is None) == (latents is None):
        raise InvalidArgument(f"{path}: give exactly one of image_bytes and latents")
    if latents is not None and OUTPUT_FORMATS[fmt] == "image":
        raise InvalidArgument(
            f"{path}: stage produces latents: use safetensors, pt or pth, or add a decode stage for {fmt}"
        )
    if image_bytes is not None and OUTPUT_FORMATS[fmt] == "latents":
        raise InvalidArgument(
            f"{path}: stage produces an image: use png, jpg or webp, or add an encode stage for {fmt}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_bytes is not None:
        path.write_bytes(_encode_image(image_bytes, _PIL_FORMATS[fmt], path, png_text or {}))
        return path
    tensor = RawTensor.of(latents)
    meta = _meta_from_handle(handle) if handle is not None else {}
    if fmt == "safetensors":
        _write_safetensors(path, tensor, {_META_PREFIX + k: v for k, v in meta.items()})
    else:
        torch = _torch_for(path)
        latents = tensor.torch()
        torch.save({"latents": latents, "baton": meta} if meta else {"latents": latents}, path)
    return path


def _encode_image(data: bytes, fmt: str, path: Path, text: Mapping[str, str]) -> bytes:
    from PIL import Image, PngImagePlugin

    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.format == fmt and not (fmt == "PNG" and text):
            return data  # already in the format asked for: re-encoding would only lose quality
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{path}: the stage's image bytes are not a readable image: {e}") from e
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if fmt == "JPEG":
        img = img.convert("RGB")  # JPEG has no alpha and no palette
    elif fmt == "WEBP" or img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        img = img.convert("RGBA" if has_alpha else "RGB")
    # Outputs are final images: keep lossy formats close to the source (PNG is lossless anyway).
    options: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "PNG" and text:
        options["pnginfo"] = PngImagePlugin.PngInfo()
        for key, value in text.items():
            options["pnginfo"].add_text(key, value)  # latin-1 as tEXt, anything else as UTF-8 iTXt
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise NotFound(f"{path}: no such file") from e
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read: {e}") from e


def _read_safetensors(path: Path) -> tuple[RawTensor, dict[str, str]]:
    # safetensors' raw form, not its numpy one: numpy has no bfloat16.
    from safetensors import SafetensorError, deserialize, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            key = _pick_key(list(f.keys()), path)
            meta = f.metadata() or {}
        entry = dict(deserialize(_read_bytes(path)))[key]
        if entry["dtype"] not in BY_CODE:
            raise InvalidArgument(f"{path}: the {key!r} entry is {entry['dtype']}, which Baton does not read")
        tensor = RawTensor(bytes(entry["data"]), BY_CODE[entry["dtype"]], tuple(entry["shape"]))
    except SafetensorError as e:
        raise InvalidArgument(f"{path}: not a readable safetensors file: {e}") from e
    return tensor, {k.removeprefix(_META_PREFIX): v for k, v in meta.items() if k.startswith(_META_PREFIX)}


def _write_safetensors(path: Path, tensor: RawTensor, metadata: dict[str, str]) -> None:
    import numpy as np
    from safetensors import TensorSpec, serialize_file

    buffer = np.frombuffer(tensor.data, dtype=np.uint8)  # kept alive across the call, as serialize asks
    spec = TensorSpec(
        dtype=tensor.dtype_name, shape=list(tensor.shape), data_ptr=buffer.ctypes.data, data_len=buffer.nbytes
    )
    serialize_file({"latents": spec}, str(path), metadata=metadata)


def _torch_for(path: Path) -> Any:
    """torch, for a .pt/.pth file; a clear refusal where the client runs without it."""
    try:
        import torch
    except ImportError:
        raise InvalidArgument(
            f"{path}: .pt/.pth files need torch (pip install torch==2.13.0 or the 'server' extra); "
            "or use .safetensors, which the client reads and writes without it"
        ) from None
    return torch


def _read_torch(path: Path) -> tuple[RawTensor, Mapping[str, Any]]:
    torch = _torch_for(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, which is exactly what Baton must not do.
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
        raise InvalidArgument(
            f"{path}: not plain tensors: torch.load(weights_only=True) refused it{f' ({why})' if why else ''}; "
            "save only tensors and plain containers, or use .safetensors"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise InvalidArgument(f"{path}: not a readable torch file: {e}") from e
    if isinstance(obj, torch.Tensor):
        return RawTensor.of(obj), {}
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of one tensor")
    meta = obj.pop("baton") if isinstance(obj.get("baton"), dict) else {}
    tensor = obj[_pick_key(list(obj), path)]
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"{path}: the latents entry is a {type(tensor).__name__}, not a tensor")
    return RawTensor.of(tensor), meta


def _pick_key(keys: list[Any], path: Path) -> Any:
    found = next((k for k in LATENT_KEYS if k in keys), None)
    if found is None and len(keys) == 1:
        found = keys[0]
    if found is None:
        raise InvalidArgument(
            f"{path}: cannot tell which entry holds the latents; found keys {sorted(map(str, keys))}, "
            f"accepted: {', '.join(LATENT_KEYS)} or a single entry"
        )
    return found


def _meta_from_handle(handle: pb.LatentHandle) -> dict[str, str]:
    scheduler = pb.SchedulerSpec()
    scheduler.CopyFrom(handle.scheduler)
    scheduler.ClearField("state")  # a blob handle in Redis means nothing in a file
    meta = {
        "space": handle.space,
        "noise": json.dumps(json_format.MessageToDict(handle.noise, preserving_proto_field_name=True)),
        "scheduler": json.dumps(json_format.MessageToDict(scheduler, preserving_proto_field_name=True)),
        "seed": str(handle.seed),
        "width": str(handle.width),
        "height": str(handle.height),
        "model": handle.model,
    }
    if handle.scaling in _SCALING_NAMES:
        meta["scaling"] = _SCALING_NAMES[handle.scaling]
    return meta


def _handle_from_meta(meta: Mapping[str, Any], path: Path) -> pb.LatentHandle:
    if not meta:
        return pb.LatentHandle(scaling=pb.LATENT_SCALING_MODEL, noise=pb.NoiseLevel(fraction=1.0))
    scalings = {v: k for k, v in _SCALING_NAMES.items()}
    try:
        handle = pb.LatentHandle(
            space=str(meta.get("space", "")),
            scaling=scalings[str(meta.get("scaling", "model"))],
            seed=int(meta.get("seed", 0)),
            width=int(meta.get("width", 0)),
            height=int(meta.get("height", 0)),
            model=str(meta.get("model", "")),
        )
        json_format.ParseDict(json.loads(meta.get("noise", "{}")), handle.noise)
        json_format.ParseDict(json.loads(meta.get("scheduler", "{}")), handle.scheduler)
    except (KeyError, ValueError, TypeError, json_format.ParseError) as e:
        raise InvalidArgument(f"{path}: malformed Baton metadata: {e!r}") from e
    return handle
