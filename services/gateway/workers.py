"""Where stages run: workers from the registry (or static addresses), and what models they hold."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.errors import BatonError, InvalidArgument, NotFound, Unavailable
from services.common.registry import WorkerRegistry
from services.common.server import grpc_options

log = logging.getLogger("baton.gateway.workers")
HOLDING = (dpb.MODEL_STATE_READY, dpb.MODEL_STATE_OFFLOADED)


@dataclass
class Worker:
    address: str
    # None for a static address that has not told us anything.
    info: wpb.WorkerInfo | None = None

    def holds(self, model: str) -> bool:
        return self.info is not None and any(m.name == model and m.state in HOLDING for m in self.info.models)

    def knows(self, model: str) -> bool:
        return self.info is not None and any(m.name == model for m in self.info.models)


class WorkerPool:
    """Picks a worker per stage: one that holds the model first, then the least busy."""

    def __init__(self, registry: WorkerRegistry, static: dict[str, list[str]], max_message_bytes: int):
        self.registry = registry
        self.static = static
        self.options = grpc_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cache: dict[str, tuple[float, list[Worker]]] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self.options)
        return self._channels[address]

    async def workers(self, kind: str, max_age_s: float = 1.0) -> list[Worker]:
        cached = self._cache.get(kind)
        if cached and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        infos = await asyncio.to_thread(self.registry.workers, kind)
        found = [Worker(i.address, i) for i in infos if i.accepting]
        seen = {w.address for w in found}
        found += [Worker(a) for a in self.static.get(kind, []) if a not in seen]
        self._cache[kind] = (time.monotonic(), found)
        return found

    async def kinds(self) -> set[str]:
        return {k for k in ("denoiser", "interposer", "processor") if await self.workers(k)}

    async def pick(self, kind: str, model: str = "", exclude: frozenset[str] = frozenset()) -> Worker:
        candidates = [w for w in await self.workers(kind, max_age_s=0.5) if w.address not in exclude]
        if not candidates:
            tried = f" (tried: {', '.join(sorted(exclude))})" if exclude else ""
            raise Unavailable(f"no {kind} worker is available{tried}")

        def rank(w: Worker) -> tuple[int, int]:
            return (0 if w.holds(model) else 1 if w.knows(model) else 2, w.info.in_flight if w.info else 0)

        return min(candidates, key=rank)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class ModelCatalog:
    """What each model is, for the planner: from worker records, else asked of a denoiser."""

    def __init__(self, pool: WorkerPool, ttl_s: float = 60.0):
        self.pool = pool
        self.ttl_s = ttl_s
        self._asked: dict[str, tuple[float, dpb.ModelInfo]] = {}

    async def resolve(self, name: str) -> dpb.ModelInfo:
        workers = await self.pool.workers("denoiser")
        for worker in workers:
            for info in worker.info.models if worker.info else ():
                if info.name == name:
                    return info
        hit = self._asked.get(name)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        askable = [w for w in workers if w.info is None or w.info.load_on_demand]
        if not askable:
            known = sorted({m.name for w in workers if w.info for m in w.info.models})
            raise InvalidArgument(f"unknown model {name!r}; the denoisers serve: {', '.join(known) or 'none'}")
        for worker in askable:
            stub = denoiser_pb2_grpc.DenoiserStub(self.pool.channel(worker.address))
            try:
                info = await stub.InspectModel(dpb.InspectModelRequest(model=name), timeout=60)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                raise InvalidArgument(exc.details() or f"unknown model {name!r}") from exc
            self._asked[name] = (time.monotonic(), info)
            return info
        raise Unavailable(f"no denoiser answered about model {name!r}")

    async def resolve_all(self, names: set[str]) -> dict[str, dpb.ModelInfo | BatonError]:
        """Each name's info, or the error to report at the stage that names it."""
        out: dict[str, dpb.ModelInfo | BatonError] = {}
        for name in names:
            try:
                out[name] = await self.resolve(name)
            except (InvalidArgument, NotFound) as exc:
                out[name] = exc
        return out
