"""A service built on the runtime for testing the runtime itself (run: python -m tests.probe_service).

Its Process RPC obeys a command in `processors[0]`:
  sleep:<s>        sleep, then answer
  raise:<Error>    raise services.common.errors.<Error>("probe says no", field="processors")
  crash            raise a plain ValueError (a bug: INTERNAL)
  echo             answer with output_key set to the request's size
"""

from __future__ import annotations

import asyncio
import sys

from services.common import errors
from services.common.api.baton.v1 import handles_pb2, processor_pb2, processor_pb2_grpc
from services.common.config import service_settings
from services.common.server import Mount, Service, main


class ProbeServicer(processor_pb2_grpc.ProcessorServicer):
    async def Process(self, request, context):
        command, _, arg = request.processors[0].partition(":")
        if command == "sleep":
            await asyncio.sleep(float(arg))
        elif command == "raise":
            raise getattr(errors, arg)("probe says no", stage="probe", field="processors")
        elif command == "crash":
            raise ValueError("a bug")
        size = str(request.ByteSize())
        return processor_pb2.ProcessResponse(latents=handles_pb2.LatentHandle(model=size))

    async def ListProcessors(self, request, context):
        return processor_pb2.ListProcessorsResponse()


def build(settings, runtime):
    return [Mount(ProbeServicer(), processor_pb2_grpc.add_ProcessorServicer_to_server, "baton.v1.Processor")]


SERVICE = Service("probe", "runtime probe", service_settings(0, 0), build)

if __name__ == "__main__":
    sys.exit(main(SERVICE))
