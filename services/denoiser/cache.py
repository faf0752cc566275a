"""ModelCache: N models resident across jobs, LRU, within a device memory budget.

Over the budget, the least recently used idle model is offloaded to host memory (when
offloading is on and the device is not the CPU) or unloaded; over the model count, it is
unloaded. A model in use is never moved. A name that is not an alias is loaded or inspected
only when `sources` (the `model-sources` setting, model_sources.py) allows it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from services.common.errors import FailedPrecondition, NotFound
from services.denoiser import metrics
from services.denoiser.model_sources import ModelSources, admit
from services.denoiser.models import LoadedModel, LoadOptions, ModelCard, card_of, inspect_model

log = logging.getLogger("baton.denoiser.cache")

Loader = Callable[[str, str, LoadOptions], LoadedModel]
Inspector = Callable[[str, str, LoadOptions], ModelCard]

READY, OFFLOADED, AVAILABLE = "ready", "offloaded", "available"


@dataclass
class _Entry:
    model: LoadedModel
    users: int = 0
    offloaded: bool = False


class ModelCache:
    def __init__(
        self,
        loader: Loader,
        *,
        defaults: LoadOptions,
        aliases: dict[str, str] | None = None,
        max_models: int = 2,
        budget_bytes: int = 0,
        offload_idle: bool = True,
        load_on_demand: bool = True,
        sources: ModelSources | None = None,
        inspector: Inspector = inspect_model,
    ):
        self._loader = loader
        self._inspector = inspector
        self._cards: dict[str, ModelCard] = {}
        self.defaults = defaults
        self.aliases = dict(aliases or {})
        self.max_models = max_models
        self.budget_bytes = budget_bytes
        self.offload_idle = offload_idle and defaults.device != "cpu"
        self.load_on_demand = load_on_demand
        # None: any source (in-process use); the service always passes its setting.
        self.sources = sources
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    # -- public ----------------------------------------------------------------------------
    def load(self, name: str, **options) -> LoadedModel:
        """Loads `name` (an alias, hub id, folder or file) unless it is resident; returns it."""
        with self.use(name, _explicit=True, **options) as model:
            return model

    @contextlib.contextmanager
    def use(self, name: str, *, _explicit: bool = False, **options) -> Iterator[LoadedModel]:
        """The model, on its device and pinned there until the block ends."""
        entry = self._acquire(name, explicit=_explicit, options=options)
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.users -= 1
                self._enforce_limits()

    def unload(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise NotFound(
                    f"model {name!r} is not loaded; loaded: {', '.join(self._entries) or 'none'}", field="model"
                )
            if entry.users:
                raise FailedPrecondition(f"model {name!r} is in use by {entry.users} job(s); unload it when they end")
            self._drop(name)
            self._publish()

    def entries(self) -> list[tuple[LoadedModel, bool]]:
        """(model, offloaded) for every loaded model, most recently used last."""
        with self._lock:
            return [(e.model, e.offloaded) for e in self._entries.values()]

    def inspect(self, name: str) -> ModelCard:
        """What `name` is, from the loaded model or its configs (cached), without loading weights."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                return card_of(entry.model)
            if name in self._cards:
                return self._cards[name]
        card = self._inspector(name, self._source(name), self.defaults)
        with self._lock:
            self._cards[name] = card
        return card

    def cards(self) -> list[tuple[ModelCard, str]]:
        """Every model this worker can serve by name: loaded ones, then inspected ones."""
        with self._lock:
            out = [(card_of(e.model), OFFLOADED if e.offloaded else READY) for e in self._entries.values()]
            out += [(card, AVAILABLE) for name, card in self._cards.items() if name not in self._entries]
        return out

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.model.memory_bytes for e in self._entries.values() if not e.offloaded)

    # -- internals -------------------------------------------------------------------------
    def _source(self, name: str) -> str:
        """Where `name` is read from: its alias's source, else itself once `sources` allows it."""
        if name in self.aliases:
            return self.aliases[name]
        return name if self.sources is None else admit(name, self.sources)

    def _acquire(self, name: str, *, explicit: bool, options: dict) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.users += 1
                self._entries.move_to_end(name)
            gate = self._loading.setdefault(name, threading.Lock())
        if entry is not None:
            self._restore(entry)
            return entry
        if not (explicit or self.load_on_demand):
            raise NotFound(f"model {name!r} is not loaded and loading on demand is off", field="model")
        with gate:  # one load per name, however many callers ask at once
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(name)
                    return entry
            began = time.perf_counter()
            model = self._loader(name, self._source(name), replace(self.defaults, **options))
            metrics.model_loaded(name, time.perf_counter() - began)
            with self._lock:
                entry = _Entry(model, users=1)
                self._entries[name] = entry
                self._enforce_limits()
        return entry

    def _restore(self, entry: _Entry) -> None:
        if entry.offloaded:
            with self._lock:
                entry.model.to(self.defaults.device)
                entry.offloaded = False
                self._enforce_limits()

    def _idle_lru(self, *, resident: bool) -> str | None:
        for name, entry in self._entries.items():
            if entry.users == 0 and (not resident or not entry.offloaded):
                return name
        return None

    def _enforce_limits(self) -> None:
        while len(self._entries) > self.max_models:
            victim = self._idle_lru(resident=False)
            if victim is None:
                break
            self._drop(victim)
        while self.budget_bytes and self.resident_bytes() > self.budget_bytes:
            victim = self._idle_lru(resident=True)
            if victim is None:
                log.warning("device budget exceeded by models in use", extra={"resident": self.resident_bytes()})
                break
            if self.offload_idle:
                self._entries[victim].model.to("cpu")
                self._entries[victim].offloaded = True
                log.info("offloaded %s to host memory", victim)
            else:
                self._drop(victim)
        self._publish()

    def _publish(self) -> None:
        """The resident-model gauges, after anything that changes what is held or where."""
        metrics.publish_resident(
            ("cpu" if e.offloaded else e.model.device, e.model.memory_bytes) for e in self._entries.values()
        )

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        entry.model.variants.clear()
        entry.model.pipe = None
        log.info("unloaded %s", name)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
