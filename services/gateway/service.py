"""The gateway service: settings, and the job store, orchestrator and servicer built from them."""

from __future__ import annotations

from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.config import Setting, service_settings
from services.common.server import Mount, Service

SETTINGS = service_settings(
    port=50051,
    metrics_port=9151,
    # Watch streams are cheap waits on Redis; batch clients hold thousands of them.
    defaults={"max-concurrency": 4096},
    extra=(
        Setting("job-retention", 86400.0, "seconds jobs, their events and their stage outputs are kept", float),
        Setting("job-lease", 10.0, "seconds before another gateway takes over a job whose gateway stopped", float),
        Setting("job-timeout", 3600.0, "default whole-job deadline in seconds (a spec's timeout_s wins)", float),
        Setting("max-running-jobs", 64, "jobs this gateway runs at once; the rest wait queued", int),
        Setting("stage-attempts", 3, "tries of a stage whose worker is UNAVAILABLE, each on another worker", int),
        Setting("max-blob-bytes", 256 << 20, "largest PutBlob upload", int),
        Setting("denoisers", "", "static denoiser addresses (comma-separated), besides the worker registry"),
        Setting("interposers", "", "static interposer addresses, besides the worker registry"),
        Setting("processors", "", "static processor addresses, besides the worker registry"),
    ),
)


def _addresses(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def build(settings, runtime) -> list[Mount]:
    from services.common.redis_conn import connect_async
    from services.common.registry import WorkerRegistry
    from services.common.workers import WorkerPool
    from services.gateway.catalog import ModelCatalog
    from services.gateway.jobs import JobStore
    from services.gateway.orchestrator import Orchestrator
    from services.gateway.servicer import GatewayServicer

    jobs = JobStore(connect_async(settings.redis_url, settings.redis_cluster), retention_s=settings.job_retention)
    static = {
        "denoiser": _addresses(settings.denoisers),
        "interposer": _addresses(settings.interposers),
        "processor": _addresses(settings.processors),
    }
    pool = WorkerPool(WorkerRegistry(runtime.redis), static, settings.max_message_bytes)
    orchestrator = Orchestrator(
        jobs, runtime.store, pool, ModelCatalog(pool), lease_s=settings.job_lease, max_attempts=settings.stage_attempts,
        max_running=settings.max_running_jobs, job_timeout_s=settings.job_timeout,
    )  # fmt: skip
    runtime.on_start(orchestrator.start)
    runtime.on_shutdown(orchestrator.stop)
    runtime.on_shutdown(pool.close)
    servicer = GatewayServicer(orchestrator, jobs, runtime.store, settings.max_blob_bytes)
    return [Mount(servicer, gateway_pb2_grpc.add_GatewayServicer_to_server, "baton.v1.Gateway")]


SERVICE = Service("gateway", "Plans jobs into stage DAGs, routes stages to workers, streams progress.", SETTINGS, build)
