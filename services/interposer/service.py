"""The interposer service: settings, and the engine and servicer built from them."""

from __future__ import annotations

from services.common import limits
from services.common.api.baton.v1 import interposer_pb2_grpc
from services.common.config import Setting, service_settings
from services.common.server import Mount, Service

SETTINGS = service_settings(
    port=50053,
    metrics_port=9153,
    worker=True,
    extra=(
        *limits.SETTINGS,
        Setting("interposer-dir", "", "folder of {src}-to-{dst}_interposer-v4.0.safetensors files"),
        Setting(
            "interposer-repo", "city96/SD-Latent-Interposer", "hub repo to fetch missing weights from, if reachable"
        ),
        Setting("device", "auto", "torch device for the networks: auto picks cuda when there is one"),
        Setting("dtype", "float32", "network dtype", choices=("float32", "float16", "bfloat16")),
        Setting("denoisers", "", "static denoiser addresses for the VAE round trip, besides the registry"),
    ),
)


def build(settings, runtime) -> list[Mount]:
    import torch

    from services.common.admission import WorkSlots
    from services.common.server import worker_pool
    from services.interposer.engine import InterposerEngine
    from services.interposer.servicer import InterposerServicer
    from services.interposer.weights import WeightsLocator

    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    static = {"denoiser": [a.strip() for a in settings.denoisers.split(",") if a.strip()]}
    pool = worker_pool(settings, runtime, static)
    locator = WeightsLocator(settings.interposer_dir, settings.interposer_repo)
    engine = InterposerEngine(runtime.store, locator, pool, device, getattr(torch, settings.dtype))
    # One conversion at a time: the engine runs torch on one thread.
    slots = WorkSlots(1, settings.max_queued, runtime.nudge)
    servicer = InterposerServicer(engine, slots)
    runtime.advertise("interposer", servicer.worker_info)
    runtime.on_drain(slots.close)
    runtime.on_shutdown(pool.close)
    return [Mount(servicer, interposer_pb2_grpc.add_InterposerServicer_to_server, "baton.v1.Interposer")]


SERVICE = Service("interposer", "Latent-space conversion between model families.", SETTINGS, build)
