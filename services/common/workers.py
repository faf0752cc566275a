"""WorkerPool: workers of each kind, from the registry (or static addresses), with cached channels.

The gateway routes stages with it; the interposer finds denoisers for its VAE fallback with it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.errors import Unavailable
from services.common.registry import WorkerRegistry
from services.common.server import grpc_options

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
