"""The denoiser service: settings, and the engine and servicer built from them."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from services.common import limits
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.config import Setting, parse_bool, service_settings
from services.common.server import Mount, Service
from services.denoiser import model_sources

# Measured with `python -m bench.checkpoint` (medium SD 1.x UNet, 64x64 latents, DPM++ state, 2 CPU
# threads, 1.7 s a step): one checkpoint costs 0.3 ms on the denoise thread (0.02% of a step) and
# 2.2 ms on the writer thread (0.13%), so every 5 steps costs under 0.03% of a step here, and stays
# under 1% on a device whose step takes 50 ms or more even if the writer's work stalled the loop.
# A worker that dies loses at most 4 steps; a drain loses none (it checkpoints at hand-off).
DEFAULT_CHECKPOINT_EVERY = 5

SETTINGS = service_settings(
    port=50052,
    metrics_port=9152,
    worker=True,
    extra=(
        *limits.SETTINGS,
        Setting("device", "auto", "torch device for models: auto picks cuda when there is one, else cpu"),
        Setting(
            "dtype",
            "auto",
            "model dtype: auto is float16 on GPUs, float32 on CPU",
            choices=("auto", "float32", "float16", "bfloat16"),
        ),
        Setting("models", "", "aliases, name=source[,name=source]: sources are hub ids, folders or .safetensors"),
        Setting("preload", "", "models (names or sources, comma-separated) loaded before health says SERVING"),
        Setting("max-models", 2, "models kept loaded across jobs (least recently used goes first)", int),
        Setting("memory-budget-gb", 0.0, "device memory for resident models; 0 = no limit", float),
        Setting(
            "offload-idle", True, "move idle models to host memory over the budget instead of unloading", parse_bool
        ),
        Setting(
            "load-on-demand",
            True,
            "load a model a request names (configured, or from model-sources); off serves only loaded models",
            parse_bool,
        ),
        # Loading reads the worker's files and the hub: what a request may name is the operator's choice.
        Setting(
            "model-sources",
            "",
            "sources a request may name beyond models and preload, comma-separated: absolute folders (a "
            "source must resolve inside one), hub:org/*, hub:org/name, hub:*; empty = configured models only",
        ),
        Setting(
            "adapter-sources",
            "",
            "sources LoRAs and textual-inversion embeddings may come from, as model-sources spells them; "
            "empty = the model-sources setting's",
        ),
        Setting(
            "concurrency",
            1,
            "windows (and encodes/decodes) run at once; the windows on one model share each step's forward (max-batch)",
            int,
        ),
        # Batching across windows: images per GPU-hour is what batch pipelines buy (bench/batching.py).
        Setting(
            "max-batch",
            0,
            "samples per shared forward (both guidance halves count); 0 = from the device (CPU 32, a GPU's free "
            "memory); 1 = no batching: windows on one model take turns, each whole",
            int,
        ),
        Setting("batch-wait-ms", 0.0, "how long a step's forward waits for more windows to join it", float),
        # A T5-XXL pass per window is seconds on Flux; the windows of one job mostly encode the same texts.
        Setting("prompt-cache-mb", 256, "text-encoder outputs kept per model (least recently used out); 0 = off", int),
        Setting(
            "checkpoint-every",
            DEFAULT_CHECKPOINT_EVERY,
            "window steps between checkpoints of a window with an output key, so a retry resumes it "
            "where it stopped; 0 = off (a drain still checkpoints at hand-off)",
            int,
        ),
    ),
)


def parse_aliases(text: str) -> dict[str, str]:
    aliases = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"BATON_MODELS: expected name=source, got {item!r}")
        aliases[name.strip()] = source.strip()
    return aliases


def parse_sources(text: str, configured: Iterable[str], env: str = model_sources.ENV) -> model_sources.ModelSources:
    try:
        return model_sources.ModelSources.parse(text, configured)
    except ValueError as exc:
        raise SystemExit(f"{env}: {exc}") from None


def build(settings, runtime) -> list[Mount]:
    import torch

    from services.common.admission import WorkSlots
    from services.denoiser.adapter_files import AdapterFiles
    from services.denoiser.cache import ModelCache
    from services.denoiser.codec import VaeCodec
    from services.denoiser.engine import DenoiseEngine
    from services.denoiser.models import LoadOptions, load_model, parse_dtype
    from services.denoiser.servicer import DenoiserServicer

    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if settings.dtype != "auto":
        dtype = parse_dtype(settings.dtype)
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    aliases = parse_aliases(settings.models)
    preload = [name.strip() for name in settings.preload.split(",") if name.strip()]
    cache = ModelCache(
        load_model,
        defaults=LoadOptions(dtype=dtype, device=device),
        aliases=aliases,
        max_models=settings.max_models,
        budget_bytes=int(settings.memory_budget_gb * (1 << 30)),
        offload_idle=settings.offload_idle,
        load_on_demand=settings.load_on_demand,
        sources=parse_sources(settings.model_sources, [*aliases, *preload]),
    )
    if settings.checkpoint_every < 0:
        raise SystemExit(f"BATON_CHECKPOINT_EVERY: 0 (off) or a step count, got {settings.checkpoint_every}")
    executor = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="denoise")
    # Preloading runs on the denoise thread too: every thread that runs torch ops gets an
    # OpenMP team of its own, and teams left on other threads slow the windows down.
    for name in preload:
        runtime.before_serving(lambda name=name: executor.submit(cache.load, name).result())
    runtime.before_serving(lambda: inspect_aliases(cache))
    runtime.on_shutdown(lambda: executor.shutdown(wait=False, cancel_futures=True))
    if settings.max_batch < 0 or settings.batch_wait_ms < 0 or settings.prompt_cache_mb < 0:
        raise SystemExit("BATON_MAX_BATCH, BATON_BATCH_WAIT_MS and BATON_PROMPT_CACHE_MB: 0 or more")
    engine = DenoiseEngine(
        runtime.store,
        cache,
        checkpoint_every=settings.checkpoint_every,
        limits=limits.Limits.from_settings(settings),
        max_batch=settings.max_batch,
        batch_wait_s=settings.batch_wait_ms / 1000,
        prompt_cache_bytes=settings.prompt_cache_mb << 20,
        adapter_files=AdapterFiles(
            parse_sources(settings.adapter_sources or settings.model_sources, [], "BATON_ADAPTER_SOURCES")
        ),
    )
    slots = WorkSlots(settings.concurrency, settings.max_queued, on_change=runtime.nudge)
    codec = VaeCodec(runtime.store, cache, limits=engine.limits, max_batch=engine.max_batch)
    servicer = DenoiserServicer(engine, codec, cache, executor, slots)
    runtime.advertise("denoiser", servicer.worker_info)
    runtime.on_drain(servicer.drain)
    return [Mount(servicer, denoiser_pb2_grpc.add_DenoiserServicer_to_server, "baton.v1.Denoiser")]


def inspect_aliases(cache) -> None:
    """Reads what each configured model is (configs only), so the gateway can plan with it."""
    import logging

    for name in cache.aliases:
        try:
            cache.inspect(name)
        except Exception as exc:  # an unreachable hub must not keep the worker from serving
            logging.getLogger("baton.denoiser").warning("cannot inspect %s: %s", name, exc)


SERVICE = Service("denoiser", "Partial-denoise windows of one model's schedule; encode and decode.", SETTINGS, build)
