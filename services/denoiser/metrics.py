"""The denoiser's metrics: steps and windows (how fast, how many, how they ended), its slots, the
models it holds, and GPU memory.

A step is milliseconds on a tiny model, so the per-step hooks look their labels up once per
window (WindowTiming) and cost a clock read and an observe a step. Gauges of things that change
on their own (slots, GPU memory) are read at scrape time; the resident-model gauges are set by
the model cache whenever what it holds changes, since reading the cache takes its lock, which a
move between devices holds for seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STEPS = Counter("baton_denoise_steps", "Denoising steps run")
WINDOWS = Counter("baton_denoise_windows", "Denoise windows by outcome", ["outcome"])
STEP_SECONDS = Histogram(
    "baton_denoise_step_duration_seconds",
    "One denoising step, by model and resolution (WxH pixels)",
    ["model", "resolution"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WINDOW_SECONDS = Histogram(
    "baton_denoise_window_duration_seconds",
    "One window, from the start of its first step to its result",
    ["model"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
IN_FLIGHT = Gauge("baton_denoise_windows_in_flight", "Windows (and encodes, decodes) running now")
QUEUED = Gauge("baton_denoise_windows_queued", "Windows (and encodes, decodes) waiting in this worker's own queue")
LOADS = Counter("baton_model_loads", "Model loads from disk or the hub (not moves between devices)", ["model"])
LOAD_SECONDS = Histogram(
    "baton_model_load_duration_seconds",
    "One model load",
    ["model"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
RESIDENT = Gauge("baton_models_resident", "Models held, by device (offloaded ones under cpu)", ["device"])
RESIDENT_BYTES = Gauge("baton_models_resident_bytes", "Parameter bytes of the models held, by device", ["device"])
PROMPT_HITS = Counter(
    "baton_prompt_cache_hits", "Prompt encodings served from the model's prompt-embedding cache", ["model"]
)
ADAPTER_LOADS = Counter(
    "baton_adapter_loads", "Adapters loaded into a model (a LoRA once per model and file)", ["kind"]
)
PROMPT_MISSES = Counter("baton_prompt_cache_misses", "Prompt encodings the text encoders ran", ["model"])
BATCHED_FORWARDS = Counter(
    "baton_denoise_forwards", "Forward passes of the denoising network, by how many windows shared one", ["windows"]
)


class WindowTiming:
    """One window's step and window durations, its label sets looked up once."""

    def __init__(self, model: str, width: int, height: int):
        self._step = STEP_SECONDS.labels(model, f"{width}x{height}")
        self._window = WINDOW_SECONDS.labels(model)
        self._step_began = 0.0
        self.first_step_at: float | None = None

    def step_began(self) -> None:
        self._step_began = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = self._step_began

    def step_ended(self) -> None:
        self._step.observe(time.perf_counter() - self._step_began)

    def window_ended(self) -> None:
        """The window's result is written; a window that ran no step (nothing left to resume) is not timed."""
        if self.first_step_at is not None:
            self._window.observe(time.perf_counter() - self.first_step_at)


def model_loaded(model: str, seconds: float) -> None:
    LOADS.labels(model).inc()
    LOAD_SECONDS.labels(model).observe(seconds)


def device_label(device: str) -> str:
    """The device's label: plain "cuda" as the one it means ("cuda:0"), so one GPU has one label."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


_devices_seen: set[str] = set()


def publish_resident(held: Iterable[tuple[str, int]]) -> None:
    """Sets the resident gauges from (device, bytes) of every model held; a device that holds none
    now reads 0 rather than keeping its last count."""
    count: dict[str, int] = {}
    size: dict[str, int] = {}
    for device, nbytes in held:
        label = device_label(device)
        count[label] = count.get(label, 0) + 1
        size[label] = size.get(label, 0) + nbytes
    _devices_seen.update(count)
    for label in _devices_seen:
        RESIDENT.labels(label).set(count.get(label, 0))
        RESIDENT_BYTES.labels(label).set(size.get(label, 0))


def watch_slots(running: Callable[[], int], queued: Callable[[], int]) -> None:
    """The window gauges read these at scrape time (the worker's WorkSlots)."""
    IN_FLIGHT.set_function(running)
    QUEUED.set_function(queued)


class GpuMemory(Collector):
    """torch's allocated and reserved bytes per CUDA device, at scrape time; nothing at all (no
    series) where CUDA is not available."""

    def describe(self) -> Iterator[Metric]:
        # Without describe(), registering would call collect(): CUDA would be asked at import.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        if not torch.cuda.is_available():
            return
        allocated, reserved = self._families()
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            allocated.add_metric([device], torch.cuda.memory_allocated(index))
            reserved.add_metric([device], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "baton_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated by device", labels=["device"]
            ),
            GaugeMetricFamily(
                "baton_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved by device", labels=["device"]
            ),
        )


REGISTRY.register(GpuMemory())


def prompt_cache_hit(model: str) -> None:
    PROMPT_HITS.labels(model).inc()


def prompt_cache_miss(model: str) -> None:
    PROMPT_MISSES.labels(model).inc()


def forward_shared(windows: int) -> None:
    """A forward that served `windows` windows (1: alone; larger ones are capped at 16+)."""
    BATCHED_FORWARDS.labels(str(windows) if windows < 16 else "16+").inc()


def adapter_loaded(kind: str) -> None:
    ADAPTER_LOADS.labels(kind).inc()
