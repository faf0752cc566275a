"""The prompt-embedding cache: a repeated prompt is encoded once per model, the cache stays within
its bytes, and a cached encoding gives the window the same result (in process, real Redis)."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from services.denoiser.prompt_cache import PromptCache
from tests.denoise_kit import request


def hits(model: str) -> float:
    return REGISTRY.get_sample_value("baton_prompt_cache_hits_total", {"model": model}) or 0.0


def engine_for(single_store, **options) -> DenoiseEngine:
    return DenoiseEngine(single_store, ModelCache(load_model, defaults=LoadOptions(), max_models=2), **options)


def encoder_calls(engine: DenoiseEngine, path: str) -> list[int]:
    """Counts the text encoder's forwards from now on."""
    calls = [0]
    model = engine.cache.load(path)
    model.pipe.text_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_two_windows_of_a_split_encode_their_prompt_once(single_store, models):
    engine = engine_for(single_store)
    path = models["sd1"]
    calls, before = encoder_calls(engine, path), hits(path)
    draft = engine.denoise(request(path, steps=6, denoising_end=0.5, width=64, height=64))
    engine.denoise(request(path, steps=6, latents=draft, width=64, height=64))
    # One encoding of the prompt and one of the negative prompt, for the first window only.
    assert calls[0] == 2
    assert hits(path) == before + 1


def test_another_prompt_or_guidance_mode_is_encoded_again(single_store, models):
    engine = engine_for(single_store)
    path = models["sd1"]
    calls = encoder_calls(engine, path)
    engine.denoise(request(path, steps=2, width=64, height=64, prompt="a cat"))
    engine.denoise(request(path, steps=2, width=64, height=64, prompt="a dog"))
    engine.denoise(request(path, steps=2, width=64, height=64, prompt="a dog", guidance_scale=1.0))  # no CFG
    assert calls[0] == 2 + 2 + 1


def test_a_cached_encoding_gives_the_same_latents(single_store, models):
    path = models["sd1"]
    cold = engine_for(single_store, prompt_cache_bytes=0)
    warm = engine_for(single_store)
    want = single_store.get_tensor(cold.denoise(request(path, steps=4, width=64, height=64)).blob)
    for _ in range(2):  # the second run is served from the cache
        got = single_store.get_tensor(warm.denoise(request(path, steps=4, width=64, height=64)).blob)
        assert torch.equal(got, want)


def test_the_least_recently_used_go_first_past_the_byte_bound():
    cache = PromptCache(max_bytes=3 * 400)
    encodes = []

    def value(name: str):
        return lambda: encodes.append(name) or (torch.zeros(100), None)  # 400 bytes

    for name in ("a", "b", "c", "a", "d", "b"):
        cache.encode(name, value(name))
    assert encodes == ["a", "b", "c", "d", "b"]  # "b" was the least recently used when "d" came
    assert cache.bytes == 3 * 400 and len(cache) == 3


@pytest.mark.parametrize("max_bytes", [0, 100])
def test_what_does_not_fit_is_not_kept(max_bytes):
    cache = PromptCache(max_bytes=max_bytes)
    cache.encode("big", lambda: torch.zeros(1000))
    assert len(cache) == 0 and cache.bytes == 0
