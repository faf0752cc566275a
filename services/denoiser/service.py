"""The denoiser service's settings and servicers."""

from __future__ import annotations

from services.common.api.baton.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.common.config import service_settings
from services.common.server import Mount, Service
from services.common.unimplemented import unimplemented_mount

SETTINGS = service_settings(port=50052, metrics_port=9152)


def build(settings, runtime) -> list[Mount]:
    return [unimplemented_mount(denoiser_pb2, denoiser_pb2_grpc, "Denoiser", "the denoiser engine lands with issue 3")]


SERVICE = Service("denoiser", "Partial-denoise windows of one model's schedule; encode and decode.", SETTINGS, build)
