"""The Interposer gRPC servicer: a few lines per RPC over InterposerEngine."""

from __future__ import annotations

from services.common.admission import WorkSlots
from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.api.baton.v1 import interposer_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.interposer.engine import InterposerEngine


class InterposerServicer(interposer_pb2_grpc.InterposerServicer):
    def __init__(self, engine: InterposerEngine, slots: WorkSlots):
        self.engine = engine
        self.slots = slots

    async def Convert(self, request, context):
        async with self.slots.admit("conversion"):
            latents, method = await self.engine.convert(request, context.time_remaining())
        return ipb.ConvertResponse(latents=latents, method=method)

    async def ListConversions(self, request, context):
        return ipb.ListConversionsResponse(conversions=self.engine.conversions())

    def worker_info(self, address: str) -> wpb.WorkerInfo:
        return self.slots.worker_info(self.engine.device)
