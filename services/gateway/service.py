"""The gateway service's settings and servicers."""

from __future__ import annotations

from services.common.api.baton.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.config import service_settings
from services.common.server import Mount, Service
from services.common.unimplemented import unimplemented_mount

SETTINGS = service_settings(port=50051, metrics_port=9151)


def build(settings, runtime) -> list[Mount]:
    return [unimplemented_mount(gateway_pb2, gateway_pb2_grpc, "Gateway", "the gateway lands with issue 4")]


SERVICE = Service("gateway", "Plans jobs into stage DAGs, routes stages to workers, streams progress.", SETTINGS, build)
