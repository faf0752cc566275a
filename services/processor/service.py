"""The processor service's settings and servicers."""

from __future__ import annotations

from services.common.api.baton.v1 import processor_pb2, processor_pb2_grpc
from services.common.config import service_settings
from services.common.server import Mount, Service
from services.common.unimplemented import unimplemented_mount

SETTINGS = service_settings(port=50054, metrics_port=9154, worker=True)


def build(settings, runtime) -> list[Mount]:
    return [
        unimplemented_mount(processor_pb2, processor_pb2_grpc, "Processor", "the processor engine lands with issue 7")
    ]


SERVICE = Service("processor", "Latents processors (noise, scale, interposer, ...) run as chains.", SETTINGS, build)
