"""What the cluster offers, from the worker registry: its models (ListModels) and its workers
(ListWorkers). Plain functions over WorkerInfo records; the servicer only hands them on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.workers import WorkerPool

KINDS = ("denoiser", "interposer", "processor")
# Where a model stands best, best first: resident, a move away, on its way, named only.
STATE_RANK = {
    dpb.MODEL_STATE_READY: 0,
    dpb.MODEL_STATE_OFFLOADED: 1,
    dpb.MODEL_STATE_LOADING: 2,
    dpb.MODEL_STATE_AVAILABLE: 3,
}


def cluster_models(workers: Iterable[wpb.WorkerInfo]) -> list[gpb.ClusterModel]:
    """One entry per model name the workers' records name, sorted by name: the ModelInfo of the
    worker where it stands best, and every worker that names it, the best-placed first."""
    found: dict[str, list[tuple[int, str, dpb.ModelInfo]]] = {}
    for worker in workers:
        for info in worker.models:
            found.setdefault(info.name, []).append((STATE_RANK.get(info.state, 4), worker.address, info))
    out = []
    for name in sorted(found):
        places = sorted(found[name], key=lambda place: place[:2])
        out.append(gpb.ClusterModel(model=places[0][2], workers=[address for _, address, _ in places]))
    return out


async def registered_workers(pool: WorkerPool) -> list[wpb.WorkerInfo]:
    """Every live registry record, draining workers included, by kind then address."""
    out = []
    for kind in KINDS:
        infos = await asyncio.to_thread(pool.registry.workers, kind)
        out += sorted(infos, key=lambda info: info.address)
    return out
