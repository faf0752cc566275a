"""The Processor gRPC servicer: a few lines per RPC over ProcessorEngine."""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import ThreadPoolExecutor

from services.common.admission import WorkSlots
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.api.baton.v1 import processor_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.processor.engine import ProcessorEngine
from services.processor.registry import REGISTRY


class ProcessorServicer(processor_pb2_grpc.ProcessorServicer):
    def __init__(self, engine: ProcessorEngine, slots: WorkSlots):
        self.engine = engine
        self.slots = slots
        # All torch work on one thread (one OpenMP team per process).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="process")

    async def Process(self, request, context):
        remaining = context.time_remaining()
        deadline = time.time() + remaining if remaining is not None and remaining < 1e6 else None
        async with self.slots.admit("processor chain"):
            loop = asyncio.get_running_loop()
            # In the call's context: the chain's log lines and interposer calls name the job and stage.
            call = contextvars.copy_context()
            return await loop.run_in_executor(self.executor, call.run, self.engine.process, request, deadline)

    async def ListProcessors(self, request, context):
        return ppb.ListProcessorsResponse(processors=[d.info() for _, d in sorted(REGISTRY.items())])

    def worker_info(self, address: str) -> wpb.WorkerInfo:
        return self.slots.worker_info(self.engine.device)
