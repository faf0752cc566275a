"""The Interposer gRPC servicer: a few lines per RPC over InterposerEngine."""

from __future__ import annotations

from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.api.baton.v1 import interposer_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.interposer.engine import InterposerEngine


class InterposerServicer(interposer_pb2_grpc.InterposerServicer):
    def __init__(self, engine: InterposerEngine):
        self.engine = engine
        self.in_flight = 0

    async def Convert(self, request, context):
        self.in_flight += 1
        try:
            latents, method = await self.engine.convert(request)
        finally:
            self.in_flight -= 1
        return ipb.ConvertResponse(latents=latents, method=method)

    async def ListConversions(self, request, context):
        return ipb.ListConversionsResponse(conversions=self.engine.conversions())

    def worker_info(self, address: str) -> wpb.WorkerInfo:
        return wpb.WorkerInfo(in_flight=self.in_flight, device=self.engine.device, accepting=True)
