"""The files a job reads and writes on the client side: job specs, input images and latents,
and outputs. Never unpickles: .pt/.pth files go through torch.load(weights_only=True)."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from google.protobuf import json_format
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2
from services.common.errors import InvalidArgument, NotFound
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
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
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


def read_latents_file(path: Path | str) -> tuple[torch.Tensor, pb.LatentHandle]:
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
    if tensor.dtype not in FLOAT_DTYPES:
        raise InvalidArgument(f"{path}: latents are {tensor.dtype}; expected float32, float16, bfloat16 or float64")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    elif tensor.dim() != 4:
        raise InvalidArgument(f"{path}: latents have shape {list(tensor.shape)}; expected [C, H, W] or [B, C, H, W]")
    return tensor, _handle_from_meta(meta, path)


def write_output(
    path: Path | str,
    *,
    image_bytes: bytes | None = None,
    latents: torch.Tensor | None = None,
    handle: pb.LatentHandle | None = None,
) -> Path:
    """Writes a stage's image or latents in the format named by the file's extension."""
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
        path.write_bytes(_encode_image(image_bytes, _PIL_FORMATS[fmt], path))
        return path
    assert latents is not None
    tensor = latents.detach().cpu().contiguous()
    meta = _meta_from_handle(handle) if handle is not None else {}
    if fmt == "safetensors":
        save_file({"latents": tensor}, str(path), metadata={_META_PREFIX + k: v for k, v in meta.items()})
    else:
        torch.save({"latents": tensor, "baton": meta} if meta else {"latents": tensor}, path)
    return path


def _encode_image(data: bytes, fmt: str, path: Path) -> bytes:
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.format == fmt:
            return data  # already in the format asked for: re-encoding would only lose quality
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{path}: the stage's image bytes are not a readable image: {e}") from e
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if fmt == "JPEG":
        img = img.convert("RGB")  # JPEG has no alpha and no palette
    elif fmt == "WEBP" or img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        img = img.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    # Outputs are final images: keep lossy formats close to the source.
    img.save(out, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise NotFound(f"{path}: no such file") from e
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read: {e}") from e


def _read_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            key = _pick_key(list(f.keys()), path)
            meta = f.metadata() or {}
            tensor = f.get_tensor(key)
    except SafetensorError as e:
        raise InvalidArgument(f"{path}: not a readable safetensors file: {e}") from e
    return tensor, {k.removeprefix(_META_PREFIX): v for k, v in meta.items() if k.startswith(_META_PREFIX)}


def _read_torch(path: Path) -> tuple[torch.Tensor, Mapping[str, Any]]:
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
        return obj, {}
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of one tensor")
    meta = obj.pop("baton") if isinstance(obj.get("baton"), dict) else {}
    tensor = obj[_pick_key(list(obj), path)]
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"{path}: the latents entry is a {type(tensor).__name__}, not a tensor")
    return tensor, meta


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
