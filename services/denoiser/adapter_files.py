"""Adapter files: where a LoRA or textual-inversion embedding comes from, what it holds, and
whether it fits a model, without loading it into one.

A source is a Hugging Face repo id, a local folder or a .safetensors file, allowed by the
denoiser's `adapter-sources` setting (model_sources.py's patterns; empty: `model-sources`'s).
Only safetensors are read: a pickle can run code when it is loaded. A folder or repo with
several .safetensors files needs `weight_name`. Files are read once and kept by path, size and
modification time; their content digest names them, so two sources with one file are one adapter.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PickledWeights
from services.denoiser.model_sources import ModelSources, allowed, local_path
from services.denoiser.models import PICKLE_SUFFIXES

SETTING = "adapter-sources"
ENV = "BATON_ADAPTER_SOURCES"
# Adapter files kept in host memory by content, least recently used out.
MAX_FILES = 32


@dataclass(frozen=True)
class AdapterFile:
    """An adapter's tensors (on the CPU, as the file holds them) and their content digest."""

    file: str
    digest: str
    bytes: int
    tensors: dict[str, torch.Tensor]


class AdapterFiles:
    """Locates, reads and keeps adapter files; `sources` None allows any (in-process use)."""

    def __init__(self, sources: ModelSources | None = None, max_files: int = MAX_FILES):
        self.sources = sources
        self.max_files = max_files
        self._files: OrderedDict[tuple, AdapterFile] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, source: str, weight_name: str = "") -> AdapterFile:
        """The adapter `source` names; errors name the field `source` (or `weight_name`)."""
        path = self.locate(source, weight_name)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        data = path.read_bytes()
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as exc:
            raise InvalidArgument(f"{path} is not a readable safetensors file: {exc}", field="source") from exc
        found = AdapterFile(str(path), xxhash.xxh3_128_hexdigest(data), len(data), tensors)
        with self._lock:
            self._files[key] = found
            while len(self._files) > self.max_files:
                self._files.popitem(last=False)
        return found

    def locate(self, source: str, weight_name: str = "") -> Path:
        """The .safetensors file `source` (and `weight_name`) names, once the setting allows it."""
        if not source:
            raise InvalidArgument("an adapter needs a source: a hub repo id, a folder or a .safetensors file")
        if Path(weight_name).name != weight_name or weight_name in (".", ".."):
            raise InvalidArgument(f"weight_name is a file name, not a path: {weight_name!r}", field="weight_name")
        if self.sources is not None and not allowed(source, self.sources):
            raise FailedPrecondition(
                f"adapter {source!r} is outside what this denoiser's {SETTING} setting ({ENV}) allows "
                f"({self.sources.describe()}); have the operator add its folder or hub:org/* to it",
                field="source",
            )
        path = local_path(source)
        if path is None:
            return _refuse_pickle(_from_hub(source, weight_name))
        if path.is_dir():
            return _refuse_pickle(_in_folder(path, weight_name))
        if not path.exists():
            raise NotFound(f"adapter {source!r} not found: no such file or folder", field="source")
        return _refuse_pickle(path)


def _in_folder(folder: Path, weight_name: str) -> Path:
    if weight_name:
        path = folder / weight_name
        if not path.is_file():
            raise NotFound(f"{folder} has no file {weight_name!r}", field="weight_name")
        return path
    return folder / _only_safetensors([p.name for p in folder.iterdir() if p.is_file()], str(folder))


def _from_hub(repo: str, weight_name: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        name = weight_name or _only_safetensors(list_repo_files(repo), repo)
        return Path(hf_hub_download(repo, name))
    except (InvalidArgument, NotFound):
        raise
    except Exception as exc:  # offline, missing repo or file: all mean "not there"
        raise NotFound(
            f"adapter {repo!r} not found: not a local file or folder, and not on the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            field="source",
        ) from exc


def _only_safetensors(names: list[str], where: str) -> str:
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        hint = f" (it has {pickles[0]}: a pickle, which Baton does not load)" if pickles else ""
        raise NotFound(f"{where} holds no .safetensors file{hint}", field="source")
    raise InvalidArgument(f"{where} holds several .safetensors files ({', '.join(found)}): name one in weight_name")


def _refuse_pickle(path: Path) -> Path:
    if path.suffix in PICKLE_SUFFIXES:
        raise PickledWeights(
            f"{path.name} is a pickle, and unpickling can run any code in it; adapters load from .safetensors "
            "only (convert it once with safetensors.torch.save_file in an environment you trust)",
            field="source",
        )
    if path.suffix != ".safetensors":
        raise InvalidArgument(f"adapters are .safetensors files: {path.name}", field="source")
    return path


# -- does a LoRA fit a model? ----------------------------------------------------------------
# The part of a key after a layer's path, in the formats diffusers' loaders produce or accept.
_DOWN = re.compile(r"\.(lora_A|lora\.down|lora_down|lora_linear_layer\.down)(\.[^.]+)?\.weight$")
_UP = re.compile(r"\.(lora_B|lora\.up|lora_up|lora_linear_layer\.up)(\.[^.]+)?\.weight$")


def lora_layers(pipeline_class: Any, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, tuple]]]:
    """Component -> layer path -> {"down": shape, "up": shape}, after diffusers' own conversion of
    the file's format (kohya and others) for the family's pipeline."""
    try:
        converted = pipeline_class.lora_state_dict(dict(tensors))
    except Exception as exc:
        raise InvalidArgument(
            f"not a LoRA diffusers reads for {pipeline_class.__name__}: {exc}", field="source"
        ) from exc
    state = converted[0] if isinstance(converted, tuple) else converted
    layers: dict[str, dict[str, dict[str, tuple]]] = {}
    for key, value in state.items():
        for side, pattern in (("down", _DOWN), ("up", _UP)):
            match = pattern.search(key)
            if match is None:
                continue
            component, _, path = key[: match.start()].partition(".")
            layers.setdefault(component, {}).setdefault(path, {})[side] = tuple(value.shape)
    if not layers:
        raise InvalidArgument("the file holds no LoRA layers (no lora_A/lora_B or lora_down/lora_up tensors)")
    return layers


def check_lora_fits(
    layers: dict[str, dict[str, dict[str, tuple]]], components: dict[str, Any], model: str, family: str
) -> None:
    """Every layer the LoRA changes exists in the model with the LoRA's input and output sizes;
    `components` maps a component name to its network (loaded, or built on the meta device)."""
    wrong: list[str] = []
    total = 0
    for component, paths in layers.items():
        network = components.get(component)
        for path, shapes in paths.items():
            total += 1
            if network is None:
                wrong.append(f"{component}.{path}: {model} has no {component}")
                continue
            why = _misfit(network, path, shapes)
            if why:
                wrong.append(f"{component}.{path}: {why}")
    if wrong:
        raise InvalidArgument(
            f"the LoRA does not fit {model} ({family}): {len(wrong)} of its {total} layers do not match, e.g. "
            f"{wrong[0]}; it looks like {_guess(layers)} LoRA",
            field="source",
        )


def check_lora_loadable(layers: dict[str, dict[str, dict[str, tuple]]]) -> None:
    """Text-encoder layers load through transformers' peft integration, which needs a newer peft
    than diffusers' own networks do: a LoRA with them is refused here when that peft is missing."""
    if not any(component.startswith("text_encoder") for component in layers):
        return
    import peft
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        raise FailedPrecondition(
            f"the LoRA changes the text encoder too, and this worker's peft {peft.__version__} is older than "
            f"the {MIN_PEFT_VERSION} transformers needs to load text-encoder LoRA layers; use a LoRA of the "
            "denoising network alone, or have the operator upgrade peft on the denoisers",
            field="source",
        )


def _misfit(network: Any, path: str, shapes: dict[str, tuple]) -> str:
    try:
        layer = network.get_submodule(path)
    except AttributeError:
        return "no such layer"
    base = getattr(layer, "base_layer", layer)  # a layer that already carries an adapter
    if isinstance(base, torch.nn.Linear):
        sizes = (base.in_features, base.out_features)
    elif isinstance(base, torch.nn.Conv2d):
        sizes = (base.in_channels, base.out_channels)
    else:
        return f"a {type(base).__name__}, which LoRAs do not change"
    down, up = shapes.get("down"), shapes.get("up")
    if down is not None and down[1] != sizes[0]:
        return f"takes {down[1]} inputs, the layer {sizes[0]}"
    if up is not None and up[0] != sizes[1]:
        return f"gives {up[0]} outputs, the layer {sizes[1]}"
    return ""


def _guess(layers: dict[str, dict[str, dict[str, tuple]]]) -> str:
    if "unet" in layers:
        return "a UNet (SD 1.x/2.x, SDXL) model's"
    if "transformer" in layers:
        paths = layers["transformer"]
        if any("single_transformer_blocks" in p for p in paths):
            return "a Flux model's"
        return "a transformer (SD3, Flux) model's"
    return "another model's"


# -- textual inversion -------------------------------------------------------------------------
@dataclass(frozen=True)
class Embedding:
    """One text encoder's vectors of a textual inversion, and the token the prompts use."""

    encoder: str  # text_encoder, text_encoder_2
    token: str
    vectors: torch.Tensor  # [n, dim]


def embeddings(tensors: dict[str, torch.Tensor], token: str) -> list[Embedding]:
    """The vectors per text encoder: SDXL files hold clip_l and clip_g, A1111 files emb_params,
    diffusers' files one tensor named by its token."""
    if "clip_l" in tensors or "clip_g" in tensors:
        if not token:
            raise InvalidArgument("an SDXL embedding (clip_l, clip_g) names no token: set token", field="token")
        parts = (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))
        return [Embedding(encoder, token, _rows(tensors[k])) for encoder, k in parts if k in tensors]
    if "emb_params" in tensors:
        if not token:
            raise InvalidArgument("the embedding (emb_params) names no token: set token", field="token")
        return [Embedding("text_encoder", token, _rows(tensors["emb_params"]))]
    if len(tensors) == 1:
        [(name, vectors)] = tensors.items()
        return [Embedding("text_encoder", token or name, _rows(vectors))]
    raise InvalidArgument(
        f"not a textual-inversion embedding: expected clip_l/clip_g, emb_params or one tensor, found {len(tensors)} "
        f"tensors ({', '.join(sorted(tensors)[:5])})",
        field="source",
    )


def _rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.reshape(1, -1) if vectors.dim() == 1 else vectors


def check_takes_embeddings(pipeline_class: Any, family: str) -> None:
    """Textual inversion loads through the pipeline's own loader, which some families lack."""
    if not hasattr(pipeline_class, "load_textual_inversion"):
        raise FailedPrecondition(
            f"{family} models take no textual-inversion embeddings (diffusers' {pipeline_class.__name__} has no "
            "load_textual_inversion); use a LoRA",
            field="source",
        )


def check_embeddings_fit(found: list[Embedding], widths: dict[str, int], model: str, family: str) -> None:
    """Each embedding's width is its text encoder's (`widths`: encoder -> embedding width)."""
    for embedding in found:
        width = widths.get(embedding.encoder)
        if width is None:
            raise FailedPrecondition(
                f"{model} ({family}) has no {embedding.encoder} for this embedding", field="source"
            )
        if embedding.vectors.shape[-1] != width:
            raise InvalidArgument(
                f"the embedding is {embedding.vectors.shape[-1]} wide, {model}'s {embedding.encoder} takes {width}: "
                "it was made for another model family",
                field="source",
            )
