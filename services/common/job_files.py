"""The files a job reads and writes on the client side: job specs, input images and latents,
and outputs. Never unpickles: .pt/.pth files go through torch.load(weights_only=True).

Torch-free: latents are RawTensors (bytes, dtype, shape), so the client and the CLI run without
torch installed; only a .pt/.pth file (and writing ComfyUI's .latent, which rescales) needs torch,
and says so when it is missing.

A latents file Baton writes keeps, next to `latents` (what dgenerate loads), the multistep
scheduler's state that an exact continuation needs: in safetensors, the state blob's tensors as
`scheduler_state.<name>` and its JSON header (format baton.scheduler_state.v1) as the metadata
key `baton.scheduler_state`; in .pt, a dict `scheduler_state` of tensors and the header as
`baton["scheduler_state"]`. ComfyUI's .latent holds `latent_tensor` in raw VAE scale.
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
from services.common.errors import BatonError, InvalidArgument, NotFound
from services.common.raw_tensor import BY_CODE, DTYPES, RawTensor, dtype_info
from services.common.spec_document import parse_spec

# A safetensors entry as safetensors' raw API gives it: dtype code ("F32"), shape, bytes.
Entry = tuple[str, list[int], bytes]

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
LATENT_SUFFIXES = (".pt", ".pth", ".safetensors", ".latent")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
OUTPUT_FORMATS = {
    "png": "image",
    "jpg": "image",
    "jpeg": "image",
    "webp": "image",
    "pt": "latents",
    "pth": "latents",
    "safetensors": "latents",
    "latent": "latents",  # ComfyUI's SaveLatent/LoadLatent
}
# Where a latents file keeps its tensor, in order of preference.
LATENT_KEYS = ("latents", "latent", "sample", "samples")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_SCALING_NAMES = {pb.LATENT_SCALING_MODEL: "model", pb.LATENT_SCALING_RAW: "raw"}
_META_PREFIX = "baton."  # safetensors metadata keys; a .pt file keeps the same fields under "baton"
STATE_PREFIX = "scheduler_state."  # a safetensors file's state tensors; a .pt file's dict is "scheduler_state"
STATE_META = "scheduler_state"  # the state's JSON header, under the metadata prefix
STATE_FORMAT = "baton.scheduler_state.v1"
# ComfyUI: latents in raw VAE scale; a file without the version key is its legacy SD 1.x model scale.
COMFY_KEY, COMFY_VERSION = "latent_tensor", "latent_format_version_0"
_SERIALIZE_NAMES = {info.code: info.name for info in DTYPES.values()}


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
    """Latents [1, C, H, W] from a .pt/.pth/.safetensors/.latent file and a LatentHandle (blob unset).

    Baton metadata written by write_output is restored. A file without it is taken as finished
    latents: space empty (the consuming model's), scaling MODEL (ComfyUI's .latent: RAW), noise.fraction 1.0.
    """
    tensor, handle, _ = read_latents_with_state(path)
    return tensor, handle


def read_latents_with_state(path: Path | str) -> tuple[RawTensor, pb.LatentHandle, bytes | None]:
    """read_latents_file, plus the scheduler state the file carries as a state blob (what the
    denoiser's save_state makes: safetensors bytes), or None; upload it as the handle's scheduler.state."""
    path = Path(path)
    if input_kind(path) != "latents":
        raise InvalidArgument(f"{path}: expected a latents file ({', '.join(LATENT_SUFFIXES)})")
    if not path.is_file():
        raise NotFound(f"{path}: no such file")
    meta: Mapping[str, Any]
    if path.suffix.lower() in (".safetensors", ".latent"):
        tensor, meta, state = _read_safetensors(path)
    else:
        tensor, meta, state = _read_torch(path)
    if not tensor.is_float:
        raise InvalidArgument(
            f"{path}: latents are {tensor.dtype_name}; expected float32, float16, bfloat16 or float64"
        )
    if len(tensor.shape) == 3:
        tensor = tensor.reshape((1, *tensor.shape))
    elif len(tensor.shape) != 4:
        raise InvalidArgument(f"{path}: latents have shape {list(tensor.shape)}; expected [C, H, W] or [B, C, H, W]")
    return tensor, _handle_from_meta(meta, path), state


def write_output(
    path: Path | str,
    *,
    image_bytes: bytes | None = None,
    latents: Any = None,
    handle: pb.LatentHandle | None = None,
    png_text: Mapping[str, str] | None = None,
    scheduler_state: bytes | None = None,
) -> Path:
    """Writes a stage's image or latents (a RawTensor, numpy array or torch tensor) in the format
    named by the file's extension; a PNG also gets `png_text` as text chunks. `scheduler_state`
    (the bytes of the handle's scheduler.state blob) goes into a safetensors or .pt file with the latents."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise InvalidArgument(f"{path}: unknown output format {fmt!r}; accepted: {', '.join(OUTPUT_FORMATS)}")
    if (image_bytes is None) == (latents is None):
        raise InvalidArgument(f"{path}: give exactly one of image_bytes and latents")
    if latents is not None and OUTPUT_FORMATS[fmt] == "image":
        raise InvalidArgument(
            f"{path}: stage produces latents: use safetensors, pt, pth or latent, or add a decode stage for {fmt}"
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
    if fmt == "latent":
        _write_comfy(path, tensor, handle)
        return path
    meta = _meta_from_handle(handle) if handle is not None else {}
    header, entries = _state_entries(scheduler_state, path) if scheduler_state else ("", {})
    if header:
        meta[STATE_META] = header
    if fmt == "safetensors":
        state = {STATE_PREFIX + name: entry for name, entry in entries.items()}
        _write_safetensors(path, {"latents": _entry(tensor), **state}, {_META_PREFIX + k: v for k, v in meta.items()})
    else:
        torch = _torch_for(path)
        obj: dict[str, Any] = {"latents": tensor.torch()}
        if meta:
            obj["baton"] = meta
        if entries:
            from safetensors.torch import load

            obj["scheduler_state"] = load(scheduler_state)  # type: ignore[arg-type]
        torch.save(obj, path)
    return path


def _write_comfy(path: Path, tensor: RawTensor, handle: pb.LatentHandle | None) -> None:
    """ComfyUI's .latent: `latent_tensor` in raw VAE scale, and the version key that tells ComfyUI so."""
    meta = _meta_from_handle(handle) if handle is not None else {}
    if handle is None or handle.scaling != pb.LATENT_SCALING_RAW:
        space = handle.space if handle is not None else ""
        if not space:
            raise InvalidArgument(
                f"{path}: a .latent file is in raw VAE scale; these latents name no space to convert by"
            )
        _torch_for(path)
        from services.common.latent_spaces import get_space

        try:
            tensor = RawTensor.of(get_space(space).to_raw(tensor.torch()))
        except BatonError as e:
            raise InvalidArgument(f"{path}: cannot write {space} latents in raw VAE scale: {e.detail}") from e
        meta["scaling"] = "raw"
    meta.pop(STATE_META, None)
    entries = {COMFY_KEY: _entry(tensor), COMFY_VERSION: ("F32", [0], b"")}
    _write_safetensors(path, entries, {_META_PREFIX + k: v for k, v in meta.items()})


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


def _read_safetensors(path: Path) -> tuple[RawTensor, dict[str, str], bytes | None]:
    # safetensors' raw form, not its numpy one: numpy has no bfloat16.
    from safetensors import SafetensorError, deserialize, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            raw_meta = f.metadata() or {}
        entries = dict(deserialize(_read_bytes(path)))
    except SafetensorError as e:
        raise InvalidArgument(f"{path}: not a readable safetensors file: {e}") from e
    meta = {k.removeprefix(_META_PREFIX): v for k, v in raw_meta.items() if k.startswith(_META_PREFIX)}
    if COMFY_KEY in keys:
        key = COMFY_KEY
        meta["scaling"] = "raw" if COMFY_VERSION in keys else "model"
    else:
        key = _pick_key([k for k in keys if not k.startswith(STATE_PREFIX)], path)
    entry = entries[key]
    if entry["dtype"] not in BY_CODE:
        raise InvalidArgument(f"{path}: the {key!r} entry is {entry['dtype']}, which Baton does not read")
    tensor = RawTensor(bytes(entry["data"]), BY_CODE[entry["dtype"]], tuple(entry["shape"]))
    state = {
        k.removeprefix(STATE_PREFIX): (e["dtype"], list(e["shape"]), bytes(e["data"]))
        for k, e in entries.items()
        if k.startswith(STATE_PREFIX)
    }
    return tensor, meta, _state_blob(meta.pop(STATE_META, ""), state, path)


def _entry(tensor: RawTensor) -> Entry:
    return dtype_info(tensor.dtype).code, list(tensor.shape), tensor.data


def _serialize(entries: Mapping[str, Entry], metadata: dict[str, str], path: Path | None = None) -> bytes:
    """safetensors bytes (or a file at `path`) of raw entries, through safetensors' raw API."""
    import numpy as np
    from safetensors import TensorSpec, serialize, serialize_file

    buffers, specs = [], {}
    for name, (code, shape, data) in entries.items():
        buffer = np.frombuffer(data, dtype=np.uint8) if data else np.zeros(1, dtype=np.uint8)
        buffers.append(buffer)  # kept alive across the call, as serialize asks
        specs[name] = TensorSpec(
            dtype=_SERIALIZE_NAMES[code], shape=shape, data_ptr=buffer.ctypes.data, data_len=len(data)
        )
    if path is not None:
        serialize_file(specs, str(path), metadata=metadata)
        return b""
    return bytes(serialize(specs, metadata=metadata))


def _write_safetensors(path: Path, entries: Mapping[str, Entry], metadata: dict[str, str]) -> None:
    _serialize(entries, metadata, path)


def _state_entries(blob: bytes, path: Path) -> tuple[str, dict[str, Entry]]:
    """A scheduler state blob (safetensors; its JSON header under the metadata key "baton") as the
    header and raw entries a latents file keeps."""
    from safetensors import SafetensorError, deserialize

    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])["__metadata__"]["baton"]
        entries = {n: (e["dtype"], list(e["shape"]), bytes(e["data"])) for n, e in deserialize(blob)}
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{path}: the scheduler state to write is not a Baton state blob: {e!r}") from e
    unknown = sorted(e[0] for e in entries.values() if e[0] not in _SERIALIZE_NAMES)
    if unknown:
        raise InvalidArgument(
            f"{path}: the scheduler state holds {', '.join(unknown)} tensors, which Baton does not write"
        )
    return header, entries


def _state_blob(header: str, entries: Mapping[str, Entry], path: Path) -> bytes | None:
    """The state blob (what save_state makes) from a file's header and entries; None when it has neither."""
    if not header and not entries:
        return None
    where = f"{_META_PREFIX}{STATE_META}"
    if not header:
        raise InvalidArgument(f"{path}: {STATE_PREFIX}* tensors without their {where} metadata")
    try:
        fmt = json.loads(header).get("format")
    except (ValueError, AttributeError) as e:
        raise InvalidArgument(f"{path}: {where} is not a JSON object: {e}") from e
    if fmt != STATE_FORMAT:
        raise InvalidArgument(f"{path}: {where} has format {fmt!r}; Baton reads {STATE_FORMAT!r}")
    unknown = sorted(n for n, e in entries.items() if e[0] not in _SERIALIZE_NAMES)
    if unknown:
        raise InvalidArgument(f"{path}: scheduler state tensors {', '.join(unknown)} have a dtype Baton does not read")
    return _serialize(entries, {"baton": header})


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


def _read_torch(path: Path) -> tuple[RawTensor, Mapping[str, Any], bytes | None]:
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
        return RawTensor.of(obj), {}, None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of one tensor")
    meta = dict(obj.pop("baton")) if isinstance(obj.get("baton"), dict) else {}
    found = obj.pop("scheduler_state") if isinstance(obj.get("scheduler_state"), dict) else {}
    tensor = obj[_pick_key(list(obj), path)]
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"{path}: the latents entry is a {type(tensor).__name__}, not a tensor")
    state = {}
    for name, value in found.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(f"{path}: scheduler_state[{name!r}] is a {type(value).__name__}, not a tensor")
        state[str(name)] = _entry(RawTensor.of(value))
    return RawTensor.of(tensor), meta, _state_blob(str(meta.pop(STATE_META, "")), state, path)


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
    if handle.seeds:
        meta["seeds"] = json.dumps([int(seed) for seed in handle.seeds])  # one per image, as a JSON list
    if handle.scaling in _SCALING_NAMES:
        meta["scaling"] = _SCALING_NAMES[handle.scaling]
    return meta


def _handle_from_meta(meta: Mapping[str, Any], path: Path) -> pb.LatentHandle:
    scalings = {v: k for k, v in _SCALING_NAMES.items()}
    if not meta.keys() - {"scaling"}:  # no Baton metadata (a ComfyUI file says only its scaling)
        scaling = scalings[str(meta.get("scaling", "model"))]
        return pb.LatentHandle(scaling=scaling, noise=pb.NoiseLevel(fraction=1.0))
    try:
        handle = pb.LatentHandle(
            space=str(meta.get("space", "")),
            scaling=scalings[str(meta.get("scaling", "model"))],
            seed=int(meta.get("seed", 0)),
            width=int(meta.get("width", 0)),
            height=int(meta.get("height", 0)),
            model=str(meta.get("model", "")),
            seeds=[int(seed) for seed in json.loads(meta.get("seeds", "[]"))],
        )
        json_format.ParseDict(json.loads(meta.get("noise", "{}")), handle.noise)
        json_format.ParseDict(json.loads(meta.get("scheduler", "{}")), handle.scheduler)
    except (KeyError, ValueError, TypeError, json_format.ParseError) as e:
        raise InvalidArgument(f"{path}: malformed Baton metadata: {e!r}") from e
    return handle
