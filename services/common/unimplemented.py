"""Servicers for RPCs whose engines have not landed: every call answers UNIMPLEMENTED."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from services.common.errors import Unimplemented


def unimplemented_servicer(base: type, service: ServiceDescriptor, why: str) -> Any:
    """An instance of `base` whose every RPC raises Unimplemented(why), never a fake result."""

    def method(name: str, streaming: bool):
        message = f"{service.full_name}/{name} is not implemented yet: {why}"
        if streaming:

            async def stream(self, request, context):
                raise Unimplemented(message)
                yield  # an async generator, as streaming handlers are

            return stream

        async def unary(self, request, context):
            raise Unimplemented(message)

        return unary

    methods = {m.name: method(m.name, m.server_streaming) for m in service.methods}
    return type(f"Unimplemented{base.__name__}", (base,), methods)()


def unimplemented_mount(pb2: Any, pb2_grpc: Any, service_name: str, why: str):
    """A Mount serving `service_name` of a generated module pair with every RPC UNIMPLEMENTED."""
    from services.common.server import Mount

    descriptor = pb2.DESCRIPTOR.services_by_name[service_name]
    base = getattr(pb2_grpc, f"{service_name}Servicer")
    add = getattr(pb2_grpc, f"add_{service_name}Servicer_to_server")
    return Mount(unimplemented_servicer(base, descriptor, why), add, descriptor.full_name)
