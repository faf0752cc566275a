"""ModelCache with real tiny pipelines: LRU, count and memory limits, pinning, single-flight loads."""

from __future__ import annotations

import threading

import pytest

from services.common.errors import FailedPrecondition, NotFound
from services.denoiser.cache import ModelCache
from services.denoiser.models import LoadOptions, load_model
from services.devkit.tiny_models import build


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-models")
    return {name: str(build("sd1", root / name, seed=i)) for i, name in enumerate("abc")}


class CountingLoader:
    """The real loader, counting how often each model is loaded."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name, source, options):
        self.calls.append(name)
        return load_model(name, source, options)


def cache_of(folders, **limits) -> tuple[ModelCache, CountingLoader]:
    loader = CountingLoader()
    return ModelCache(loader, defaults=LoadOptions(), aliases=folders, **limits), loader


def loaded(cache: ModelCache) -> list[str]:
    return [model.name for model, _ in cache.entries()]


def test_least_recently_used_model_goes_first(folders):
    cache, loader = cache_of(folders, max_models=2)
    cache.load("a")
    cache.load("b")
    cache.load("a")  # a is now the most recent
    cache.load("c")
    assert loaded(cache) == ["a", "c"]
    assert loader.calls == ["a", "b", "c"], "a stayed resident and was not loaded again"


def test_a_model_in_use_is_never_evicted(folders):
    cache, _ = cache_of(folders, max_models=1)
    with cache.use("a") as model:
        cache.load("b")  # over the limit: b is the only idle model, so b goes
        assert model.pipe is not None and loaded(cache) == ["a"]


def test_memory_budget_unloads_idle_models_on_a_cpu(folders):
    cache, _ = cache_of(folders, max_models=3)
    size = cache.load("a").memory_bytes
    cache.budget_bytes = size + size // 2
    cache.load("b")
    assert loaded(cache) == ["b"]
    assert cache.resident_bytes() <= cache.budget_bytes


def test_concurrent_requests_load_a_model_once(folders):
    cache, loader = cache_of(folders, max_models=2)
    threads = [threading.Thread(target=cache.load, args=("a",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == ["a"]


def test_without_load_on_demand_only_loaded_models_serve(folders):
    cache, _ = cache_of(folders, load_on_demand=False)
    with pytest.raises(NotFound, match="not loaded"), cache.use("a"):
        pass
    cache.load("a")
    with cache.use("a") as model:
        assert model.family.name == "sd1"


def test_unloading_a_model_in_use_is_refused(folders):
    cache, _ = cache_of(folders)
    with cache.use("a"), pytest.raises(FailedPrecondition, match="in use"):
        cache.unload("a")
    cache.unload("a")
    assert loaded(cache) == []
    with pytest.raises(NotFound, match="not loaded"):
        cache.unload("a")


def test_loaded_models_read_their_sizes_from_their_configs(folders):
    cache, _ = cache_of(folders)
    model = cache.load("a")
    assert model.vae_scale_factor == 2 and model.latent_channels == 4
    assert model.default_size == (64, 64) and model.space.scale == pytest.approx(0.18215)
    assert model.scheduler_class == "EulerDiscreteScheduler"
