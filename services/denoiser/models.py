"""Loading diffusers pipelines from a hub id, a local folder or a single .safetensors file.

Weights load from safetensors only: a pickle (.ckpt, .pt, .bin) can run any code when it is
loaded, so a pickled checkpoint, or a folder whose weights are pickles, is refused with how to
convert it, and from_pretrained is told use_safetensors=True (which is what holds for hub ids).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PickledWeights
from services.common.latent_spaces import LatentSpace
from services.denoiser.prompt_cache import PromptCache

if TYPE_CHECKING:
    from services.denoiser.families.base import Family

log = logging.getLogger("baton.denoiser.models")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def parse_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}", field=field_name) from None


@dataclass(frozen=True)
class LoadOptions:
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    variant: str | None = None
    # Force a family when it cannot be read from the files (single-file checkpoints).
    family: str | None = None
    # A diffusers folder or hub id whose component configs a single-file checkpoint uses.
    config: str | None = None


@dataclass
class LoadedModel:
    """A resident pipeline and what Baton read off its configs."""

    name: str
    source: str
    family: Family
    pipe: Any
    space: LatentSpace
    dtype: torch.dtype
    device: str
    vae_scale_factor: int
    latent_channels: int
    default_size: tuple[int, int]
    memory_bytes: int
    # The model's own scheduler as loaded; runs set their own scheduler on the pipeline.
    scheduler_class: str = ""
    scheduler_config: dict = field(default_factory=dict)
    # Windows that do not batch (max-batch 1), Encode and Decode take turns on the model with it.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Pipelines for other modes (img2img, inpaint) sharing this one's components.
    variants: dict[str, Any] = field(default_factory=dict)
    # The windows in flight on this model share their forward passes here (batching.py); made by
    # the engine on first use.
    batcher: Any = None
    # Encode and Decode requests on this model share VAE forwards here (codec.py); made on first use.
    vae_batcher: Any = None
    # The LoRAs loaded into this model (adapters.ModelAdapters); made by the engine on first use.
    adapters: Any = None
    # Text-encoder outputs by what they encoded (prompt_cache.py); encoding runs under its lock.
    prompts: PromptCache = field(default_factory=PromptCache)
    _variants_lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, device: str) -> None:
        self.pipe.to(device)
        self.device = device

    def variant(self, kind: str, cls: Any) -> Any:
        """The `cls` pipeline over the same components (diffusers' from_pipe: no new weights)."""
        if type(self.pipe) is cls:
            return self.pipe
        with self._variants_lock:
            if kind not in self.variants:
                self.variants[kind] = cls.from_pipe(self.pipe)
            return self.variants[kind]

    def window_pipe(self, kind: str, cls: Any) -> Any:
        """The `cls` pipeline for one window: a shallow copy, so the window can set its own scheduler
        on it (the pipelines' helpers read pipe.scheduler) while other windows run on the same
        components."""
        return copy.copy(self.variant(kind, cls))


def module_bytes(pipe: Any) -> int:
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


def _pipeline_class_name(source: str) -> str:
    """The `_class_name` of a diffusers folder or hub repo (reads model_index.json only)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(source)
    except Exception as exc:  # OSError, EnvironmentError, hub errors: all mean "not there"
        raise NotFound(
            f"model {source!r} not found: not a local diffusers folder, not a .safetensors file, "
            f"and not loadable from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            field="model",
        ) from exc
    return str(config["_class_name"])


def _refuse_pickled_file(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise PickledWeights(
            f"{path} is a pickled checkpoint, and unpickling can run any code in it; Baton loads .safetensors "
            f"only. Convert it once, in an environment you trust: load its state dict with torch.load and save "
            f"it with safetensors.torch.save_file(state_dict, {path.stem + '.safetensors'!r}), then name that file",
            field="model",
        )
    if path.suffix != ".safetensors":
        raise InvalidArgument(f"single-file checkpoints must be .safetensors files: {path}", field="model")


def _refuse_pickled_folder(folder: Path) -> None:
    """Refuses a diffusers folder with a component whose weights are pickles and not also safetensors."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in component.iterdir() if p.is_file()]
        pickles = sorted(p for p in files if p.suffix in PICKLE_SUFFIXES)
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise PickledWeights(
                f"{pickles[0]} is a pickle, and unpickling can run any code in it; Baton loads safetensors "
                f"weights only. Convert the folder once, in an environment you trust: load it with diffusers' "
                f"DiffusionPipeline.from_pretrained({str(folder)!r}) and save it with "
                f"save_pretrained(new_folder, safe_serialization=True), then name the new folder",
                field="model",
            )


def _single_file_family(path: Path) -> str:
    """Guesses the family of an original-format checkpoint from its tensor names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    joined = "\n".join(keys[:5000])
    if "conditioner.embedders.1" in joined:
        return "sdxl"
    if "joint_blocks" in joined:
        return "sd3"
    if "double_blocks" in joined:
        return "flux"
    if "model.diffusion_model.input_blocks" in joined:
        return "sd1"
    raise FailedPrecondition(
        f"cannot tell the family of {path.name} from its tensor names; set the model's family explicitly",
        field="family",
    )


def load_model(name: str, source: str, options: LoadOptions) -> LoadedModel:
    """Loads `source` (hub id, folder or .safetensors file) as the family's pipeline."""
    from services.denoiser.families import family_by_name, family_for_pipeline

    path = Path(source).expanduser()
    if path.is_file():
        _refuse_pickled_file(path)
        family = family_by_name(options.family or _single_file_family(path))
        pipe = family.pipeline_class.from_single_file(str(path), config=options.config, dtype=options.dtype)
    else:
        if path.is_dir():
            _refuse_pickled_folder(path)
        class_name = _pipeline_class_name(str(path) if path.is_dir() else source)
        family = family_by_name(options.family) if options.family else family_for_pipeline(class_name)
        kwargs: dict[str, Any] = {"dtype": options.dtype, "use_safetensors": True}
        if options.variant:
            kwargs["variant"] = options.variant
        try:
            pipe = family.load(str(path) if path.is_dir() else source, class_name, kwargs)
        except OSError as exc:  # diffusers' word for "no safetensors weights in this repo"
            if "safetensors" not in str(exc):
                raise
            raise PickledWeights(
                f"{source} has no safetensors weights ({str(exc).splitlines()[0]}); Baton loads no pickles. "
                f"Convert it once, in an environment you trust: load it with diffusers' from_pretrained and "
                f"save it with save_pretrained(new_folder, safe_serialization=True), then name the new folder",
                field="model",
            ) from exc
    pipe.to(options.device)
    pipe.set_progress_bar_config(disable=True)
    vae_config = dict(pipe.vae.config)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    model = LoadedModel(
        name=name,
        source=source,
        family=family,
        pipe=pipe,
        space=family.latent_space(vae_config),
        dtype=options.dtype,
        device=options.device,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(vae_config["latent_channels"]),
        default_size=family.default_size(dict(getattr(pipe, family.denoiser_subfolder).config), vae_scale_factor),
        memory_bytes=module_bytes(pipe),
        scheduler_class=type(pipe.scheduler).__name__,
        scheduler_config=dict(pipe.scheduler.config),
    )
    log.info(
        "loaded %s",
        name,
        extra={"source": source, "family": family.name, "space": model.space.id, "bytes": model.memory_bytes},
    )
    return model


@dataclass(frozen=True)
class ModelCard:
    """What a model is, read from its configs alone: enough to plan a job without loading it."""

    name: str
    source: str
    family: str
    space: str
    vae_scale_factor: int
    latent_channels: int
    default_size: tuple[int, int]
    scheduler_class: str
    size_multiple: int


def card_of(model: LoadedModel) -> ModelCard:
    return ModelCard(
        name=model.name,
        source=model.source,
        family=model.family.name,
        space=model.space.id,
        vae_scale_factor=model.vae_scale_factor,
        latent_channels=model.latent_channels,
        default_size=model.default_size,
        scheduler_class=model.scheduler_class,
        size_multiple=model.family.size_multiple(model.vae_scale_factor),
    )


def inspect_model(name: str, source: str, options: LoadOptions) -> ModelCard:
    """Reads a diffusers folder's or hub repo's configs (no weights) into a ModelCard."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from services.denoiser.families import family_by_name, family_for_pipeline

    path = Path(source).expanduser()
    if path.is_file():
        _refuse_pickled_file(path)
        raise FailedPrecondition(f"{path.name} is a single-file checkpoint; load it to learn what it is", field="model")
    if path.is_dir():
        _refuse_pickled_folder(path)
    where = str(path) if path.is_dir() else source
    class_name = _pipeline_class_name(where)
    family = family_by_name(options.family) if options.family else family_for_pipeline(class_name)
    # load_config reads a subfolder's config file without checking it belongs to the class.
    vae_config = dict(AutoencoderKL.load_config(where, subfolder="vae"))
    denoiser_config = dict(AutoencoderKL.load_config(where, subfolder=family.denoiser_subfolder))
    scheduler_config = dict(DDIMScheduler.load_config(where, subfolder="scheduler"))
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return ModelCard(
        name=name,
        source=source,
        family=family.name,
        space=family.latent_space(vae_config).id,
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(vae_config["latent_channels"]),
        default_size=family.default_size(denoiser_config, vae_scale_factor),
        scheduler_class=str(scheduler_config["_class_name"]),
        size_multiple=family.size_multiple(vae_scale_factor),
    )
