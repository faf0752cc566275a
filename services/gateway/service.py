"""The gateway service: settings, and the job store, orchestrator and servicer built from them."""

from __future__ import annotations

from services.common import limits
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.auth import TENANTS
from services.common.config import Setting, service_settings
from services.common.server import Mount, Service

SETTINGS = service_settings(
    port=50051,
    metrics_port=9151,
    # Watch streams are cheap waits on Redis; batch clients hold thousands of them.
    defaults={"max-concurrency": 4096},
    extra=(
        *limits.SETTINGS,
        Setting("job-retention", 86400.0, "seconds jobs, their events and their stage outputs are kept", float),
        Setting("job-lease", 10.0, "seconds before another gateway takes over a job whose gateway stopped", float),
        Setting("job-timeout", 3600.0, "default whole-job deadline in seconds (a spec's timeout_s wins)", float),
        Setting("max-running-jobs", 64, "jobs this gateway runs at once; the rest wait queued (for any replica)", int),
        Setting(
            "stage-attempts",
            3,
            "tries of a stage whose worker died, froze or stalled while running it, each "
            "on another worker; busy or draining workers are waited out and never count",
            int,
        ),
        Setting(
            "stall-timeout",
            30.0,
            "seconds a denoise window may send no step event (at least; 10x the model's "
            "recent step time when that is longer) before it is cancelled and retried elsewhere",
            float,
        ),
        Setting(
            "worker-wait",
            300.0,
            "seconds a stage waits for a worker of its kind to register before it fails (within the job's deadline)",
            float,
        ),
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
    from services.common.server import worker_pool
    from services.gateway.catalog import ModelCatalog
    from services.gateway.jobs import JobStore
    from services.gateway.orchestrator import Orchestrator
    from services.gateway.servicer import GatewayServicer

    # Every Watch holds a connection through its blocking read: with redis-py's default pool of 100,
    # a burst of watchers made lease renewals fail "Too many connections" (bench/load.py, 200 jobs).
    redis = connect_async(
        settings.redis_url,
        settings.redis_cluster,
        settings.redis_timeout,
        max_connections=settings.max_concurrency + 64,
    )
    jobs = JobStore(redis, retention_s=settings.job_retention)
    static = {
        "denoiser": _addresses(settings.denoisers),
        "interposer": _addresses(settings.interposers),
        "processor": _addresses(settings.processors),
    }
    pool = worker_pool(settings, runtime, static, worker_wait_s=settings.worker_wait, attempts=settings.stage_attempts)
    orchestrator = Orchestrator(
        jobs,
        runtime.store,
        pool,
        ModelCatalog(pool),
        lease_s=settings.job_lease,
        max_running=settings.max_running_jobs,
        job_timeout_s=settings.job_timeout,
        stall_timeout_s=settings.stall_timeout,
        limits=limits.Limits.from_settings(settings),
        max_blob_bytes=settings.max_blob_bytes,
    )
    runtime.on_start(orchestrator.start)
    runtime.on_drain(orchestrator.drain)
    runtime.on_shutdown(orchestrator.stop)
    runtime.on_shutdown(pool.close)
    servicer = GatewayServicer(orchestrator, jobs, runtime.store, settings.max_blob_bytes)
    return [Mount(servicer, gateway_pb2_grpc.add_GatewayServicer_to_server, "baton.v1.Gateway", callers=TENANTS)]


SERVICE = Service("gateway", "Plans jobs into stage DAGs, routes stages to workers, streams progress.", SETTINGS, build)
