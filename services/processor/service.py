"""The processor service: settings, and the engine and servicer built from them."""

from __future__ import annotations

from services.common import limits
from services.common.api.baton.v1 import processor_pb2_grpc
from services.common.config import Setting, service_settings
from services.common.server import Mount, Service

SETTINGS = service_settings(
    port=50054,
    metrics_port=9154,
    worker=True,
    extra=(
        *limits.SETTINGS,
        Setting("device", "auto", "default torch device of processors: auto picks cuda when there is one"),
        Setting("plugins", "", "extra processor modules to import (comma-separated dotted names)"),
        Setting("interposers", "", "static interposer addresses for the interposer processor, besides the registry"),
    ),
)


def build(settings, runtime) -> list[Mount]:
    import torch

    from services.common.admission import WorkSlots
    from services.common.server import worker_pool
    from services.processor.engine import InterposerClient, ProcessorEngine
    from services.processor.registry import load_builtin, load_plugins
    from services.processor.servicer import ProcessorServicer

    load_builtin()
    load_plugins(settings.plugins)
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    static = {"interposer": [a.strip() for a in settings.interposers.split(",") if a.strip()]}
    pool = worker_pool(settings, runtime, static)
    convert = InterposerClient(pool)
    runtime.on_start(convert.bind)
    runtime.on_shutdown(pool.close)
    # One chain at a time: the engine runs torch on one thread.
    slots = WorkSlots(1, settings.max_queued, runtime.nudge)
    servicer = ProcessorServicer(
        ProcessorEngine(runtime.store, device, convert, limits.Limits.from_settings(settings)), slots
    )
    runtime.advertise("processor", servicer.worker_info)
    runtime.on_drain(slots.close)
    return [Mount(servicer, processor_pb2_grpc.add_ProcessorServicer_to_server, "baton.v1.Processor")]


SERVICE = Service("processor", "Latents processors (noise, scale, interposer, ...) run as chains.", SETTINGS, build)
