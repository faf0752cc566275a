"""The interposer service's settings and servicers."""

from __future__ import annotations

from services.common.api.baton.v1 import interposer_pb2, interposer_pb2_grpc
from services.common.config import service_settings
from services.common.server import Mount, Service
from services.common.unimplemented import unimplemented_mount

SETTINGS = service_settings(port=50053, metrics_port=9153, worker=True)


def build(settings, runtime) -> list[Mount]:
    return [
        unimplemented_mount(
            interposer_pb2, interposer_pb2_grpc, "Interposer", "the interposer engine lands with issue 6"
        )
    ]


SERVICE = Service("interposer", "Latent-space conversion between model families.", SETTINGS, build)
