"""ModelCatalog: what each model and processor is, for the planner and the discovery RPCs,
without loading anything."""

from __future__ import annotations

import asyncio
import re
import time

import grpc

from services.common.api.baton.v1 import adapters_pb2 as apb
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc, processor_pb2_grpc
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.errors import BatonError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.workers import Worker, WorkerPool
from services.gateway.discovery import cluster_models

# A lookup never waits longer than this, whatever the caller's deadline.
LOOKUP_S = 60.0
# How long a model or adapter lookup waits for a denoiser to be registered: a worker that just
# started, or whose record lapsed for a heartbeat, is transient; no denoiser at all is not.
WORKER_WAIT_S = 5.0


class ModelCatalog:
    """What each model is, for the planner: from worker records, else asked of a denoiser."""

    def __init__(self, pool: WorkerPool, ttl_s: float = 60.0):
        self.pool = pool
        self.ttl_s = ttl_s
        self._asked: dict[str, tuple[float, dpb.ModelInfo]] = {}
        self._adapters: dict[bytes, tuple[float, apb.AdapterInfo]] = {}
        self._processors: tuple[float, dict[str, ppb.ProcessorInfo]] | None = None

    async def resolve(self, name: str, deadline: float) -> dpb.ModelInfo:
        workers = await self.pool.workers("denoiser")
        for worker in workers:
            for info in worker.info.models if worker.info else ():
                if info.name == name:
                    return info
        hit = self._asked.get(name)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        if workers and not any(w.serves(name) for w in workers):
            known = sorted({m.name for w in workers if w.info for m in w.info.models})
            raise InvalidArgument(f"unknown model {name!r}; the denoisers serve: {', '.join(known) or 'none'}")

        async def inspect(channel, worker: Worker, timeout: float) -> dpb.ModelInfo:
            stub = denoiser_pb2_grpc.DenoiserStub(channel)
            return await stub.InspectModel(dpb.InspectModelRequest(model=name), timeout=timeout)

        try:
            info = await self.pool.call(
                "denoiser",
                inspect,
                deadline=min(deadline, time.time() + LOOKUP_S),
                model=name,
                what=f"looking up model {name!r}",
                light=True,
                wait_s=WORKER_WAIT_S,
            )
        except grpc.aio.AioRpcError as exc:
            # The denoiser's verdict keeps its kind: pickled weights or a source its model-sources
            # setting does not allow are a precondition, a typo an argument. The planner locates it
            # at the stage's field, so the denoiser's own "field 'model': " goes.
            kind = FailedPrecondition if exc.code() == grpc.StatusCode.FAILED_PRECONDITION else InvalidArgument
            detail = (exc.details() or "").removeprefix("field 'model': ")
            raise kind(detail or f"unknown model {name!r}") from exc
        except BatonError as exc:
            raise Unavailable(f"no denoiser answered about model {name!r}: {exc}") from exc
        self._asked[name] = (time.monotonic(), info)
        return info

    async def adapters(
        self,
        requests: list[apb.InspectAdapterRequest],
        models: dict[str, dpb.ModelInfo | BatonError],
        deadline: float,
    ) -> dict[bytes, apb.AdapterInfo | BatonError]:
        """Each adapter's info, or the error to report at the field that names it (by the request's
        bytes); adapters of models that did not resolve are left to the model's error."""
        keys = {r.SerializeToString(deterministic=True): r for r in requests}
        wanted = {k: r for k, r in keys.items() if isinstance(models.get(r.model), dpb.ModelInfo)}
        found = await asyncio.gather(*(self.adapter(r, deadline) for r in wanted.values()), return_exceptions=True)
        out: dict[bytes, apb.AdapterInfo | BatonError] = {}
        for key, result in zip(wanted, found, strict=True):
            if isinstance(result, InvalidArgument | NotFound | FailedPrecondition | apb.AdapterInfo):
                out[key] = result
            elif isinstance(result, BaseException):
                raise result
        return out

    async def adapter(self, request: apb.InspectAdapterRequest, deadline: float) -> apb.AdapterInfo:
        """What a denoiser holding (or able to hold) the model says of the adapter; kept ttl_s."""
        key = request.SerializeToString(deterministic=True)
        hit = self._adapters.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]

        async def inspect(channel, worker: Worker, timeout: float) -> apb.AdapterInfo:
            return await denoiser_pb2_grpc.DenoiserStub(channel).InspectAdapter(request, timeout=timeout)

        kind = request.WhichOneof("adapter")
        try:
            info = await self.pool.call(
                "denoiser",
                inspect,
                deadline=min(deadline, time.time() + LOOKUP_S),
                model=request.model,
                what=f"looking up a {kind} for model {request.model!r}",
                light=True,
                wait_s=WORKER_WAIT_S,
            )
        except grpc.aio.AioRpcError as exc:
            # The denoiser's verdict keeps its kind, and its field within the adapter
            # ("field 'lora.source': ..."): the planner puts it under the stage's field.
            error = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition}
            detail = exc.details() or f"the {kind} could not be read"
            match = re.match(r"field '[a-z_]+\.([^']*)': (.*)", detail, re.DOTALL)
            fld, detail = (match.group(1), match.group(2)) if match else ("", detail)
            raise error.get(exc.code(), InvalidArgument)(detail, field=fld) from exc
        except BatonError as exc:
            raise Unavailable(f"no denoiser answered about a {kind} for model {request.model!r}: {exc}") from exc
        self._adapters[key] = (time.monotonic(), info)
        return info

    async def processors(self, deadline: float) -> dict[str, ppb.ProcessorInfo]:
        """The processors a processor worker declares (empty when none is available)."""
        if self._processors and time.monotonic() - self._processors[0] < self.ttl_s:
            return self._processors[1]

        async def listing(channel, worker: Worker, timeout: float) -> ppb.ListProcessorsResponse:
            stub = processor_pb2_grpc.ProcessorStub(channel)
            return await stub.ListProcessors(ppb.ListProcessorsRequest(), timeout=timeout)

        try:
            reply = await self.pool.call(
                "processor",
                listing,
                deadline=min(deadline, time.time() + LOOKUP_S),
                what="listing processors",
                light=True,
                wait_s=0,
            )
        except (BatonError, grpc.aio.AioRpcError):
            return {}
        infos = {p.name: p for p in reply.processors}
        self._processors = (time.monotonic(), infos)
        return infos

    async def processor_list(self, deadline: float) -> list[ppb.ProcessorInfo]:
        """What `processors` finds, for ListProcessors: Unavailable when no processor worker
        answers, since an empty list would read as "there are no processors"."""
        infos = await self.processors(deadline)
        if not infos:
            why = "none answered" if await self.pool.workers("processor") else "none is registered"
            raise Unavailable(f"no processor worker to list the processors: {why}")
        return list(infos.values())

    async def models(self) -> list[gpb.ClusterModel]:
        """Every model the accepting denoisers' records name, with where each stands best."""
        return cluster_models(w.info for w in await self.pool.workers("denoiser") if w.info is not None)

    async def resolve_all(self, names: set[str], deadline: float) -> dict[str, dpb.ModelInfo | BatonError]:
        """Each name's info, or the error to report at the stage that names it."""
        out: dict[str, dpb.ModelInfo | BatonError] = {}
        for name in names:
            try:
                out[name] = await self.resolve(name, deadline)
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                out[name] = exc
        return out
