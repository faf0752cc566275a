"""InspectAdapter: whether an adapter exists, is safetensors and fits a model, without loading
either: what the gateway asks at Submit, so that a LoRA for another family or a missing file is
refused before any GPU work, with the stage and field named.

The model's layers come from the loaded model when this worker holds it, else from its configs,
built on the meta device (no memory, no weights). A model whose configs cannot be read that way
(a single-file checkpoint not loaded yet) is checked when a window loads the adapter into it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import torch

from services.common.api.baton.v1 import adapters_pb2 as apb
from services.common.errors import InvalidArgument
from services.common.rules import located
from services.denoiser.adapter_files import (
    AdapterFiles,
    check_embeddings_fit,
    check_lora_fits,
    check_lora_loadable,
    check_takes_embeddings,
    embeddings,
    lora_layers,
)
from services.denoiser.adapters import encoder_widths
from services.denoiser.cache import ModelCache
from services.denoiser.families import family_by_name
from services.denoiser.models import ModelCard

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class AdapterInspector:
    def __init__(self, cache: ModelCache, files: AdapterFiles):
        self.cache = cache
        self.files = files
        self._built: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def inspect(self, request: apb.InspectAdapterRequest) -> apb.AdapterInfo:
        card = self.cache.inspect(request.model)
        family = family_by_name(card.family)
        kind = request.WhichOneof("adapter")
        if kind == "lora":
            with located(prefix="lora."):
                found = self.files.read(request.lora.source, request.lora.weight_name)
                layers = lora_layers(family.pipeline_class, found.tensors)
                check_lora_fits(layers, self.components(card, list(layers)), card.name, family.name)
                check_lora_loadable(layers)
            return apb.AdapterInfo(
                kind=kind, file=found.file, digest=found.digest, bytes=found.bytes, components=sorted(layers)
            )
        if kind == "textual_inversion":
            inversion = request.textual_inversion
            with located(prefix="textual_inversion."):
                check_takes_embeddings(family.pipeline_class, family.name)
                found = self.files.read(inversion.source, inversion.weight_name)
                vectors = embeddings(found.tensors, inversion.token)
                components = self.components(card, [e.encoder for e in vectors])
                if not any(e.encoder in components and components[e.encoder] is None for e in vectors):
                    check_embeddings_fit(vectors, encoder_widths(components), card.name, family.name)
            return apb.AdapterInfo(
                kind=kind,
                file=found.file,
                digest=found.digest,
                bytes=found.bytes,
                components=sorted({e.encoder for e in vectors}),
                tokens=sorted({e.token for e in vectors}),
            )
        raise InvalidArgument("name the adapter: lora or textual_inversion", field="adapter")

    def components(self, card: ModelCard, names: list[str]) -> dict[str, Any]:
        """Each named component of the model: its network, None where it cannot be told (then it is
        not checked here), absent where the model has none."""
        for model, _offloaded in self.cache.entries():
            if model.name == card.name and model.pipe is not None:
                return {n: c for n, c in model.pipe.components.items() if n in names and c is not None}
        try:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(card.source)
        except Exception:  # a single file, or configs out of reach: the window checks
            return dict.fromkeys(names)
        out = {}
        for name in names:
            entry = index.get(name)
            if isinstance(entry, list | tuple) and entry[0] is not None:
                out[name] = self._meta(card.source, name, entry[0], entry[1])
        return out

    def _meta(self, source: str, name: str, library: str, class_name: str) -> Any:
        key = (source, name)
        with self._lock:
            if key in self._built:
                return self._built[key]
        try:
            cls = getattr(importlib.import_module(library), class_name)
            with torch.device("meta"):
                if library == "transformers":
                    from transformers import AutoConfig

                    network = cls._from_config(AutoConfig.from_pretrained(source, subfolder=name))
                else:
                    network = cls.from_config(cls.load_config(source, subfolder=name))
        except Exception:  # a class this cannot build bare: the window checks
            network = None
        with self._lock:
            self._built[key] = network
        return network
