"""The gateway's metrics: jobs through their life on this gateway, stages, the shared queue and the
workers there are. The orchestrator and dispatcher call the functions here at each transition;
the queue and worker gauges hold what the dispatcher's census last read, so a scrape never waits
on Redis.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.api.baton.v1 import jobs_pb2 as jpb

# Seconds, from a step-sized wait to a long job's hours.
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

QUEUE_DEPTH = Gauge("baton_queue_depth", "Jobs waiting in the shared queue (every gateway sees the same: use max())")
WORKERS = Gauge("baton_workers", "Registered, accepting workers by kind", ["kind"])
JOBS_RUNNING = Gauge("baton_jobs_running", "Jobs this gateway runs now")
SUBMITTED = Counter("baton_jobs_submitted", "Jobs created by Submit or Run on this gateway")
FINISHED = Counter("baton_jobs_finished", "Jobs ended by this gateway, by final state", ["state"])
QUEUE_WAIT = Histogram("baton_job_queue_wait_seconds", "Job created -> taken by a gateway", buckets=JOB_BUCKETS)
JOB_DURATION = Histogram(
    "baton_job_duration_seconds", "Job created -> ended, by final state", ["state"], buckets=JOB_BUCKETS
)
STAGE_DURATION = Histogram(
    "baton_stage_duration_seconds",
    "A succeeded stage's run on this gateway, start -> end, by kind and model ('' where none)",
    ["kind", "model"],
    buckets=JOB_BUCKETS,
)

STATES = {
    jpb.JOB_STATE_SUCCEEDED: "succeeded",
    jpb.JOB_STATE_FAILED: "failed",
    jpb.JOB_STATE_CANCELLED: "cancelled",
}


def _seconds(start, end) -> float:
    """Seconds between two Timestamps; 0 when either is unset or the clocks of two replicas disagree."""
    return max((end.ToNanoseconds() - start.ToNanoseconds()) / 1e9, 0.0)


def job_taken(job: jpb.Job) -> None:
    """The job is RUNNING for the first time (`started_at` just set)."""
    QUEUE_WAIT.observe(_seconds(job.created_at, job.started_at))


def job_ended(job: jpb.Job) -> None:
    """The job reached its final state here (its record was written so)."""
    state = STATES.get(job.state)
    if state is None:
        return
    FINISHED.labels(state).inc()
    JOB_DURATION.labels(state).observe(_seconds(job.created_at, job.finished_at))


def stage_succeeded(kind: str, model: str, stage: jpb.StageStatus) -> None:
    # Failed stages stay out: their time says how soon they failed, not how long the work takes.
    STAGE_DURATION.labels(kind, model).observe(_seconds(stage.started_at, stage.finished_at))


def census(queue_depth: int, workers: dict[str, int]) -> None:
    """What the dispatcher read: the queue's length and the workers of each kind."""
    QUEUE_DEPTH.set(queue_depth)
    for kind, count in workers.items():
        WORKERS.labels(kind).set(count)
