"""Encode and Decode requests on one model share VAE forwards (codec.py over batching.py): each
gets what it would have alone, other shapes and the other method are never mixed in, the VAE is
upcast once per shared forward, and a Decode beside a preparing window waits for it and ends.

The calls are lined up by holding the model's lock, as a preparing window holds it: the first call
in takes the forward and waits there for the lock, the ones after it queue in the batcher, and when
the lock goes the first runs alone and the queued ones share the next forwards. So which calls
share is known, not left to thread timing.

Tolerance: a request batched is within RELATIVE (1e-5) of its largest magnitude from the same
request alone; a call that ran alone is bit-identical (torch.equal). Not bit-exact, measured on
2 CPU threads with the tiny sd1 and sdxl VAEs: CPU conv kernels choose their path by batch size,
so a row can move in the last bits with its batchmates. Here decoded pixels (clamped to [-1, 1])
are at most 1.7e-6 off, encoded latents (mode or seeded sample) at most 2.7e-7 (8e-7 relative);
at 256 px, unclamped, up to 3.4e-6 on magnitudes near 2 (1.9e-6 relative). Some batched rows
come out bit-identical, most do not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.denoiser import vae
from services.denoiser.cache import ModelCache
from services.denoiser.codec import VaeBatcher, VaeCodec
from services.denoiser.models import LoadedModel, LoadOptions, load_model
from tests.denoise_kit import make_engine, png, request, sample_image

RELATIVE = 1e-5
# Long enough for a tiny model's slowest step here on a loaded 2-core machine; a deadlock never ends.
BOUND_S = 30.0


@pytest.fixture(scope="module")
def engine(single_store):
    return make_engine(single_store)


@pytest.fixture(scope="module")
def codec(engine):
    return VaeCodec(engine.store, engine.cache)


def latents(store, batch: int, side: int = 8, seed: int = 5) -> pb.LatentHandle:
    tensor = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))
    return pb.LatentHandle(blob=store.put_tensor(tensor), space="", scaling=pb.LATENT_SCALING_MODEL,
                           noise=pb.NoiseLevel(fraction=1.0))  # fmt: skip


def decoding(codec: VaeCodec, model: str, batch: int, side: int = 8, seed: int = 5) -> Callable[[], torch.Tensor]:
    """A Decode to a tensor of `batch` latents of `side` x `side`, to run alone or lined up."""
    req = dpb.DecodeRequest(model=model, latents=latents(codec.store, batch, side, seed), format="tensor")
    return lambda: codec.store.get_tensor(codec.decode(req).images[0])


def encoding(codec: VaeCodec, model: str, batch: int, seed: int | None, pixels: int = 0) -> Callable[[], torch.Tensor]:
    """An Encode of `batch` 64 x 64 pixel tensors (one per image field; `pixels` seeds them), to
    the posterior's mode or, with `seed`, a sample."""
    g = torch.Generator().manual_seed(pixels)
    images = [codec.store.put_tensor(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1) for _ in range(batch)]
    req = dpb.EncodeRequest(model=model, images=images, **({} if seed is None else {"seed": seed}))
    return lambda: codec.store.get_tensor(codec.encode(req).blob)


def close(alone: torch.Tensor, batched: torch.Tensor) -> bool:
    return bool((alone - batched).abs().max() <= RELATIVE * alone.abs().max())


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def queued(batcher: VaeBatcher) -> int:
    with batcher._cond:
        return len(batcher._pending)


class Running:
    """`fn` on a daemon thread (a deadlocked one cannot hold the test run at exit), its result or
    error kept."""

    def __init__(self, fn: Callable[[], Any]):
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:
            self.error = exc

    def result(self) -> Any:
        self.thread.join(BOUND_S)
        assert not self.thread.is_alive(), f"still running after {BOUND_S} s"
        if self.error is not None:
            raise self.error
        return self.value


def lined_up(model: LoadedModel, batcher: VaeBatcher, first: Callable[[], Any], rest: list[Callable[[], Any]]):
    """Runs `first`, then `rest` at once, while the model's lock is held as a preparing window holds
    it: `first` runs alone once the lock goes, and `rest` queue behind it; their results in order."""
    with model.lock:
        running = [Running(first)]
        until(lambda: batcher._busy and queued(batcher) == 0, "the first call waits in its forward")
        running += [Running(fn) for fn in rest]
        until(lambda: queued(batcher) == len(rest), "the other calls queue behind it")
    return [r.result() for r in running]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_concurrent_decodes_of_one_shape_share_a_forward_and_each_gets_its_own_images(codec, models, family):
    model = codec.cache.load(models[family])
    batcher = codec.batcher(model)
    calls = [decoding(codec, models[family], batch, seed=seed) for batch, seed in ((1, 1), (2, 2), (1, 3), (1, 4))]
    alone = [call() for call in calls]
    forwards, served = batcher.forwards, batcher.calls
    together = lined_up(model, batcher, calls[0], calls[1:])
    assert (batcher.forwards - forwards, batcher.calls - served) == (2, 4), "the three queued calls share one forward"
    assert torch.equal(together[0], alone[0]), "the call that ran alone is untouched"
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.shape == b.shape and close(a, b), f"request {i}: max difference {(a - b).abs().max().item()}"


def test_concurrent_encodes_share_a_forward_and_each_samples_its_own_rows_with_its_own_seed(codec, models):
    path = models["sd1"]
    model = codec.cache.load(path)
    batcher = codec.batcher(model)
    asked = [(1, None), (2, 7), (1, None), (1, 9), (2, None)]
    calls = [encoding(codec, path, batch, seed, pixels=i) for i, (batch, seed) in enumerate(asked)]
    alone = [call() for call in calls]
    forwards, served = batcher.forwards, batcher.calls
    together = lined_up(model, batcher, calls[0], calls[1:])
    assert (batcher.forwards - forwards, batcher.calls - served) == (2, 5), "the four queued calls share one forward"
    assert torch.equal(together[0], alone[0])
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.shape == b.shape and close(a, b), f"request {i}: max difference {(a - b).abs().max().item()}"
    # A seeded sample is its posterior's mean plus noise of its own: the same request unseeded is far off.
    assert not close(encoding(codec, path, 2, None, pixels=1)(), together[1])


def test_calls_of_other_shapes_or_the_other_method_are_not_mixed_into_a_forward(codec, models):
    path = models["sd1"]
    model = codec.cache.load(path)
    batcher = codec.batcher(model)
    small, large = decoding(codec, path, 1, side=8, seed=1), decoding(codec, path, 1, side=16, seed=2)
    other_small, other_large = decoding(codec, path, 2, side=8, seed=3), decoding(codec, path, 1, side=16, seed=4)
    calls = [
        small,
        large,
        other_small,
        encoding(codec, path, 1, None, pixels=9),
        other_large,
        decoding(codec, path, 1, seed=5),
    ]
    alone = [call() for call in calls]
    sizes: list[tuple[int, ...]] = []
    decode = batcher.decode

    def watched(**kwargs: Any) -> Any:
        sizes.append(tuple(kwargs["z"].shape))
        return decode(**kwargs)

    batcher.decode = watched  # type: ignore[assignment]
    try:
        together = lined_up(model, batcher, calls[0], calls[1:])
    finally:
        batcher.decode = decode
    # The first alone; then the 8x8 latents together, the 16x16 ones together, the Encode alone.
    assert sorted(sizes) == [(1, 4, 8, 8), (2, 4, 16, 16), (3, 4, 8, 8)]
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.shape == b.shape and close(a, b), f"request {i}: max difference {(a - b).abs().max().item()}"


def test_a_float16_vae_is_upcast_once_per_shared_forward_and_put_back(single_store, models, monkeypatch):
    cache = ModelCache(load_model, defaults=LoadOptions(dtype=torch.float16), max_models=1)
    codec = VaeCodec(single_store, cache)
    model = cache.load(models["sdxl"])
    assert model.pipe.vae.config.force_upcast
    batcher = codec.batcher(model)
    flips = []
    upcast = vae.upcast

    def counted(m: Any):
        flips.append(m.pipe.vae.dtype)
        return upcast(m)

    monkeypatch.setattr(vae, "upcast", counted)
    calls = [decoding(codec, models["sdxl"], 1, seed=seed) for seed in (1, 2, 3)]
    alone = [call() for call in calls]
    flips.clear()
    together = lined_up(model, batcher, calls[0], calls[1:])
    assert flips == [torch.float16, torch.float16], "one upcast per forward: the first alone, the others shared"
    assert model.pipe.vae.dtype == torch.float16
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert close(a, b), f"request {i}: max difference {(a - b).abs().max().item()}"


def test_a_decode_beside_a_window_that_is_preparing_waits_for_it_and_ends(engine, codec, models, monkeypatch):
    path = models["sd1"]
    model = codec.cache.load(path)
    batcher = codec.batcher(model)
    calls = [decoding(codec, path, 1, seed=seed) for seed in (1, 2)]
    alone = [call() for call in calls]
    # The window holds the model's lock from before its family's run until its first forward; it
    # waits at the start of that run until the Decodes are in. An img2img window, so its
    # preparation uses the VAE too.
    preparing, go = threading.Event(), threading.Event()
    run = model.family.run

    def held(*args: Any) -> Any:
        preparing.set()
        assert go.wait(BOUND_S)
        return run(*args)

    monkeypatch.setattr(model.family, "run", held)
    image = engine.store.put_bytes(png(sample_image()), media_type="image/png")
    window = Running(lambda: engine.denoise(request(path, image=image, steps=2, width=64, height=64)))
    assert preparing.wait(BOUND_S) and model.lock.locked()
    decodes = [Running(calls[0])]
    until(lambda: batcher._busy, "the first Decode waits in its forward")
    decodes.append(Running(calls[1]))
    until(lambda: queued(batcher) == 1, "the second Decode queues behind it")
    time.sleep(0.1)
    assert all(d.thread.is_alive() for d in decodes), "no VAE forward while the window prepares"
    go.set()
    assert window.result().blob.key
    for i, (d, a) in enumerate(zip(decodes, alone, strict=True)):
        assert torch.equal(d.result(), a), f"Decode {i}: each ran alone, so exactly as alone"
