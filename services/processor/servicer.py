"""The Processor gRPC servicer: a few lines per RPC over ProcessorEngine."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.api.baton.v1 import processor_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.processor.engine import ProcessorEngine
from services.processor.registry import REGISTRY


class ProcessorServicer(processor_pb2_grpc.ProcessorServicer):
    def __init__(self, engine: ProcessorEngine):
        self.engine = engine
        # All torch work on one thread (one OpenMP team per process).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="process")
        self.in_flight = 0

    async def Process(self, request, context):
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.process, request)
        finally:
            self.in_flight -= 1

    async def ListProcessors(self, request, context):
        return ppb.ListProcessorsResponse(processors=[d.info() for _, d in sorted(REGISTRY.items())])

    def worker_info(self, address: str) -> wpb.WorkerInfo:
        return wpb.WorkerInfo(in_flight=self.in_flight, device=self.engine.device, accepting=True)
