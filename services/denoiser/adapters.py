"""Adapters on a loaded model: LoRAs loaded once per model and switched per window, textual
inversions loaded into the tokenizer and text encoder(s) only while a window encodes its prompts.

LoRAs go in through diffusers' own loader (`load_lora_weights`, peft), named by their content
digest, so a second window with the same file reuses it and two jobs with different LoRAs on one
base model alternate without reloading it. Which adapters are active, and at what weights, is the
network's state, shared by every window on the model: each forward sets its window's set first
(ActiveLoras.apply, a no-op when it is already set), and windows with different sets never share
a batched forward (the set is part of the batch key, batching.py). With no LoRA the adapter
layers are switched off, so the base model's result is what it was before any LoRA was loaded.

Text encoders run one window at a time (under the model's lock): the window's text-encoder LoRAs
are applied and its embeddings loaded around the encoding, and unloaded after it, and the prompt
cache keys the encoding by both (TextAdapters.encoding: prompt_cache.encoding_with).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.api.baton.v1 import adapters_pb2 as apb
from services.common.rules import located
from services.denoiser import metrics, prompt_cache
from services.denoiser.adapter_files import (
    AdapterFile,
    AdapterFiles,
    Embedding,
    check_embeddings_fit,
    check_lora_fits,
    check_lora_loadable,
    check_takes_embeddings,
    embeddings,
    lora_layers,
)

# LoRAs kept loaded per model, least recently used out (one not in use by a window).
MAX_LORAS = 8


@dataclass(frozen=True)
class ActiveLoras:
    """The LoRAs a window runs with: adapter names and weights, in the stage's order (peft sums
    their outputs in this order). Hashable: part of the batch key."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    def apply(self, network: Any) -> None:
        """Makes these the network's active adapters (none: its adapter layers off)."""
        if network is None or _APPLIED.get(network) == self:
            return
        if getattr(network, "peft_config", None):
            from diffusers.loaders.lora_base import set_adapters_for_text_encoder
            from diffusers.utils.peft_utils import set_adapter_layers

            set_adapter_layers(network, enabled=bool(self.names))
            if self.names and hasattr(network, "set_adapters"):  # diffusers' networks
                network.set_adapters(list(self.names), list(self.weights))
            elif self.names:  # transformers' text encoders
                set_adapters_for_text_encoder(list(self.names), network, list(self.weights))
        _APPLIED[network] = self


# The set each network last ran with: applying it again is free.
_APPLIED: weakref.WeakKeyDictionary[Any, ActiveLoras] = weakref.WeakKeyDictionary()


def _forget_applied(pipe: Any) -> None:
    """After a load or delete changed which adapters are active: the next apply sets them again."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _APPLIED.pop(component, None)


@dataclass(frozen=True)
class TextAdapters:
    """What a window's text encoders run with: its LoRAs and its textual-inversion embeddings."""

    loras: ActiveLoras = ActiveLoras()
    inversions: tuple[tuple[str, str], ...] = ()  # (digest, token): the prompt cache's key part
    embeddings: tuple[Embedding, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple:
        return self.loras.names, self.loras.weights, self.inversions

    def encoding(self, pipe: Any) -> contextlib.AbstractContextManager[None]:
        """Around a window's preparation: its prompt encodings run with these adapters."""
        return prompt_cache.encoding_with(self.key, lambda: self.applied(pipe))

    @contextlib.contextmanager
    def applied(self, pipe: Any) -> Iterator[None]:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            self.loras.apply(getattr(pipe, name, None))
        loaded: list[tuple[Any, Any, list[str]]] = []
        try:
            for embedding in self.embeddings:
                tokenizer = getattr(pipe, embedding.encoder.replace("text_encoder", "tokenizer"))
                encoder = getattr(pipe, embedding.encoder)
                pipe.load_textual_inversion(
                    embedding.vectors, token=embedding.token, tokenizer=tokenizer, text_encoder=encoder
                )
                count = embedding.vectors.shape[0]
                tokens = [embedding.token] + [f"{embedding.token}_{i}" for i in range(1, count)]
                loaded.append((tokenizer, encoder, tokens))
            yield
        finally:
            for tokenizer, encoder, tokens in reversed(loaded):
                pipe.unload_textual_inversion(tokens=tokens, tokenizer=tokenizer, text_encoder=encoder)


class ModelAdapters:
    """The LoRAs loaded into one model, by content digest; used under the model's lock."""

    def __init__(self, max_loras: int = MAX_LORAS):
        self.max_loras = max_loras
        self.loaded: OrderedDict[str, str] = OrderedDict()  # digest -> adapter name
        self.in_use: dict[str, int] = {}
        self._lock = threading.Lock()

    def activate(self, model: Any, loras: list[tuple[AdapterFile, float]], exclusive: Callable[[], Any]) -> ActiveLoras:
        """Loads what is not loaded yet (with `exclusive()` held: no forward runs on the model
        meanwhile) and returns the window's set; `release` it when the window ends."""
        names = []
        for found, _scale in loras:
            name = f"lora_{found.digest[:16]}"
            if found.digest not in self.loaded:
                with exclusive():
                    model.pipe.load_lora_weights(dict(found.tensors), adapter_name=name)
                    _forget_applied(model.pipe)
                metrics.adapter_loaded("lora")
                self.loaded[found.digest] = name
            self.loaded.move_to_end(found.digest)
            names.append(name)
        with self._lock:
            for name in names:
                self.in_use[name] = self.in_use.get(name, 0) + 1
        self._evict(model, exclusive)
        return ActiveLoras(tuple(names), tuple(scale for _, scale in loras))

    def release(self, active: ActiveLoras) -> None:
        with self._lock:
            for name in active.names:
                self.in_use[name] -= 1

    def _evict(self, model: Any, exclusive: Callable[[], Any]) -> None:
        while len(self.loaded) > self.max_loras:
            with self._lock:
                idle = [d for d, n in self.loaded.items() if not self.in_use.get(n)]
            if not idle:
                return
            name = self.loaded.pop(idle[0])
            with exclusive():
                model.pipe.delete_adapters(name)
                _forget_applied(model.pipe)


def lora_scale(lora: apb.Lora) -> float:
    return lora.scale if lora.HasField("scale") else 1.0


@dataclass
class WindowAdapters:
    """A window's adapters, read from their files and checked against the model."""

    loras: list[tuple[AdapterFile, float]]
    inversions: list[tuple[AdapterFile, list[Embedding]]]

    @classmethod
    def read(cls, files: AdapterFiles, model: Any, loras: Any, inversions: Any) -> WindowAdapters:
        family = model.family
        pipe = model.pipe
        out = cls([], [])
        for i, lora in enumerate(loras):
            with located(prefix=f"loras[{i}]."):
                found = files.read(lora.source, lora.weight_name)
                layers = lora_layers(type(pipe), found.tensors)
                check_lora_fits(layers, dict(pipe.components), model.name, family.name)
                check_lora_loadable(layers)
            out.loras.append((found, lora_scale(lora)))
        for i, inversion in enumerate(inversions):
            with located(prefix=f"textual_inversions[{i}]."):
                check_takes_embeddings(type(pipe), family.name)
                found = files.read(inversion.source, inversion.weight_name)
                vectors = embeddings(found.tensors, inversion.token)
                check_embeddings_fit(vectors, encoder_widths(dict(pipe.components)), model.name, family.name)
            out.inversions.append((found, vectors))
        return out

    def text(self, active: ActiveLoras) -> TextAdapters:
        return TextAdapters(
            loras=active,
            inversions=tuple((found.digest, e.token) for found, vectors in self.inversions for e in vectors),
            embeddings=tuple(e for _, vectors in self.inversions for e in vectors),
        )


def encoder_widths(components: dict[str, Any]) -> dict[str, int]:
    """Each text encoder's token-embedding width."""
    widths = {}
    for name in ("text_encoder", "text_encoder_2"):
        embed = getattr(components.get(name), "get_input_embeddings", None)
        if callable(embed):
            widths[name] = int(embed().weight.shape[-1])
    return widths
