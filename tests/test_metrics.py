"""The metric catalog (issue 16) as each service serves it: one small job and one refused Submit
on the shared cluster, then every service's /metrics, parsed as Prometheus parses it. Counters
are compared before and after, so earlier tests on the same cluster do not matter."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import BlobCorrupt, Unavailable
from services.common.redis_conn import connect
from services.common.registry import WorkerRegistry
from services.common.workers import Stalled, WorkerPool
from services.devkit.cluster import ServiceProcess

STEPS = 3
SERVICES = ("gateway", "denoiser", "processor", "interposer")


def scrape(process: ServiceProcess) -> list[Sample]:
    url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`; 0 when there is none."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def has(samples: list[Sample], name: str, **labels: str) -> bool:
    return any(s.name == name and labels.items() <= s.labels.items() for s in samples)


def gateway_call(method: str, grpc_type: str = "unary", **more: str) -> dict[str, str]:
    return {"grpc_service": "baton.v1.Gateway", "grpc_method": method, "grpc_type": grpc_type, **more}


def job_spec() -> jpb.JobSpec:
    return json_format.ParseDict(
        {"name": "metrics", "seed": 3, "width": 64, "height": 64,
         "stages": [{"name": "draw", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": STEPS}},
                    {"name": "picture", "decode": {"latents": "draw"}}],
         "outputs": [{"stage": "picture", "format": "png"}]},
        jpb.JobSpec(),
    )  # fmt: skip


def wait_until(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


class Scrapes:
    """Each service's samples before and after the job and the refused Submit."""

    def __init__(self, cluster):
        self.processes = {
            "gateway": cluster.gateway,
            "denoiser": cluster.denoisers[0],
            "processor": cluster.processor,
            "interposer": cluster.interposer,
        }
        self.before = {name: scrape(p) for name, p in self.processes.items()}
        self.after: dict[str, list[Sample]] = {}
        self.events: list[jpb.JobEvent] = []

    def rescrape(self) -> None:
        self.after = {name: scrape(p) for name, p in self.processes.items()}

    def delta(self, service: str, name: str, **labels: str) -> float:
        return value(self.after[service], name, **labels) - value(self.before[service], name, **labels)


@pytest.fixture(scope="module")
def scrapes(checked_cluster) -> Scrapes:
    seen = Scrapes(checked_cluster)
    with checked_cluster.client() as client:
        seen.events = list(client.run(job_spec(), timeout=120))
        job_id = seen.events[-1].job_id
        assert seen.events[-1].job_state == jpb.JOB_STATE_SUCCEEDED, seen.events[-1]
        list(client.watch(job_id))  # a Watch of the ended job: one more stream
        refused = job_spec()
        refused.stages[0].denoise.steps = -1
        with pytest.raises(grpc.RpcError) as info:
            client.submit(refused)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    gateway = checked_cluster.gateway
    # The run ends when its last event is written; the gateway lets go of the job just after.
    wait_until(lambda: value(scrape(gateway), "baton_jobs_running") == 0, "the gateway still runs the job")
    seen.rescrape()
    return seen


# -- every service -------------------------------------------------------------------------------
def test_a_unary_call_is_counted_started_and_handled_by_code_and_timed(scrapes):
    assert scrapes.delta("gateway", "grpc_server_started_total", **gateway_call("Submit")) == 1
    ok = scrapes.delta("gateway", "grpc_server_handled_total", **gateway_call("Submit", grpc_code="OK"))
    refused = scrapes.delta(
        "gateway", "grpc_server_handled_total", **gateway_call("Submit", grpc_code="INVALID_ARGUMENT")
    )
    assert (ok, refused) == (0, 1)
    assert scrapes.delta("gateway", "grpc_server_handling_seconds_count", **gateway_call("Submit")) == 1


def test_streams_are_timed_in_their_own_histogram_never_in_the_unary_one(scrapes):
    for method in ("Run", "Watch"):
        call = gateway_call(method, "server_stream")
        assert scrapes.delta("gateway", "grpc_server_stream_duration_seconds_count", **call) >= 1, method
        assert scrapes.delta("gateway", "grpc_server_handled_total", **call, grpc_code="OK") >= 1, method
    denoise = {"grpc_service": "baton.v1.Denoiser", "grpc_method": "Denoise", "grpc_type": "server_stream"}
    assert scrapes.delta("denoiser", "grpc_server_stream_duration_seconds_count", **denoise) == 1
    for service, method in (("gateway", "Run"), ("gateway", "Watch"), ("denoiser", "Denoise")):
        assert not has(scrapes.after[service], "grpc_server_handling_seconds_count", grpc_method=method)


def test_stream_messages_are_counted_each_way(scrapes):
    run = gateway_call("Run", "server_stream")
    assert scrapes.delta("gateway", "grpc_server_msg_received_total", **run) == 1
    assert scrapes.delta("gateway", "grpc_server_msg_sent_total", **run) == len(scrapes.events)
    denoise = {"grpc_service": "baton.v1.Denoiser", "grpc_method": "Denoise"}
    # At least a status, a step event each and the result.
    assert scrapes.delta("denoiser", "grpc_server_msg_sent_total", **denoise) >= STEPS + 2


def test_no_call_is_in_flight_once_they_ended(scrapes):
    assert value(scrapes.after["gateway"], "grpc_server_in_flight", grpc_method="Run") == 0
    assert value(scrapes.after["denoiser"], "grpc_server_in_flight", grpc_method="Denoise") == 0


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_counts_its_health_checks(scrapes, service):
    check = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_type": "unary"}
    assert value(scrapes.after[service], "grpc_server_handled_total", **check, grpc_code="OK") >= 1


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_serves_created_series_or_the_old_grpc_names(scrapes, service):
    names = {s.name for s in scrapes.after[service]}
    assert not [n for n in names if n.endswith("_created")]
    assert not [n for n in names if n.startswith("baton_grpc_")]


def test_blob_bytes_written_and_read_are_counted(scrapes):
    assert scrapes.delta("denoiser", "baton_blob_written_bytes_total") > 0  # the latents, the picture
    assert scrapes.delta("denoiser", "baton_blob_read_bytes_total") > 0  # the decode reads the latents
    assert scrapes.delta("denoiser", "baton_blob_digest_failures_total") == 0


# -- the gateway ---------------------------------------------------------------------------------
def test_the_gateway_counts_the_job_through_its_life(scrapes):
    assert scrapes.delta("gateway", "baton_jobs_submitted_total") == 1  # the refused Submit made none
    assert scrapes.delta("gateway", "baton_jobs_finished_total", state="succeeded") == 1
    assert scrapes.delta("gateway", "baton_job_duration_seconds_count", state="succeeded") == 1
    assert scrapes.delta("gateway", "baton_job_queue_wait_seconds_count") == 1
    assert value(scrapes.after["gateway"], "baton_jobs_running") == 0


def test_stages_are_timed_by_kind_and_model(scrapes):
    assert scrapes.delta("gateway", "baton_stage_duration_seconds_count", kind="denoise", model="sd1-a") == 1
    assert scrapes.delta("gateway", "baton_stage_duration_seconds_count", kind="decode") == 1
    duration = scrapes.delta("gateway", "baton_stage_duration_seconds_sum", kind="denoise", model="sd1-a")
    assert 0 < duration < 120


def test_the_gateway_reports_the_queue_and_the_workers_by_kind(scrapes):
    after = scrapes.after["gateway"]
    assert has(after, "baton_queue_depth") and value(after, "baton_queue_depth") == 0
    gateway = scrapes.processes["gateway"]
    # Read every CENSUS_EVERY_S: workers that registered after the gateway started show by the next reading.
    for kind in ("denoiser", "interposer", "processor"):
        wait_until(lambda kind=kind: value(scrape(gateway), "baton_workers", kind=kind) >= 1, f"no {kind} counted")


# -- the denoiser --------------------------------------------------------------------------------
def test_each_step_is_timed_by_model_and_resolution(scrapes):
    timed = scrapes.delta("denoiser", "baton_denoise_step_duration_seconds_count", model="sd1-a", resolution="64x64")
    assert timed == STEPS == scrapes.delta("denoiser", "baton_denoise_steps_total")
    assert scrapes.delta("denoiser", "baton_denoise_window_duration_seconds_count", model="sd1-a") == 1
    assert scrapes.delta("denoiser", "baton_denoise_windows_total", outcome="ok") == 1


def test_the_denoiser_reports_its_slots(scrapes):
    after = scrapes.after["denoiser"]
    assert has(after, "baton_denoise_windows_in_flight") and value(after, "baton_denoise_windows_in_flight") == 0
    assert has(after, "baton_denoise_windows_queued") and value(after, "baton_denoise_windows_queued") == 0


def test_the_denoiser_reports_the_models_it_loaded_and_holds(scrapes):
    after = scrapes.after["denoiser"]
    assert value(after, "baton_model_loads_total", model="sd1-a") >= 1
    assert value(after, "baton_model_load_duration_seconds_count", model="sd1-a") >= 1
    assert value(after, "baton_models_resident", device="cpu") >= 1
    assert value(after, "baton_models_resident_bytes", device="cpu") > 0


def test_a_cpu_denoiser_has_no_gpu_memory_series(scrapes):
    assert not [s for s in scrapes.after["denoiser"] if s.name.startswith("baton_gpu_memory_")]


# -- in process ----------------------------------------------------------------------------------
def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_blob_reads_that_do_not_match_their_handle_count_as_digest_failures(single_store):
    written, read = sample("baton_blob_written_bytes_total"), sample("baton_blob_read_bytes_total")
    handle = single_store.put_bytes(b"0123456789")
    assert bytes(single_store.get_bytes(handle)) == b"0123456789"
    assert sample("baton_blob_written_bytes_total") - written == 10
    assert sample("baton_blob_read_bytes_total") - read == 10
    failures = sample("baton_blob_digest_failures_total")
    single_store.redis.set(f"{handle.key}:{handle.generation}:0", b"9876543210")
    with pytest.raises(BlobCorrupt):
        single_store.get_bytes(handle)
    with pytest.raises(BlobCorrupt):
        list(single_store.iter_chunks(handle))
    assert sample("baton_blob_digest_failures_total") - failures == 2


def refusal(code: grpc.StatusCode, hint: str = "") -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata(("baton-retry", hint)) if hint else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, "no")


@pytest.mark.parametrize(
    "failure,stage_kind,labels",
    [
        (refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"), "decode", {"kind": "decode", "reason": "busy"}),
        (refusal(grpc.StatusCode.UNAVAILABLE, "draining"), "denoise", {"kind": "denoise", "reason": "draining"}),
        (refusal(grpc.StatusCode.UNAVAILABLE, "redis"), "", {"kind": "denoiser", "reason": "redis"}),
        (refusal(grpc.StatusCode.UNAVAILABLE), "", {"kind": "denoiser", "reason": "lost"}),
        (Stalled("no step for 30 s"), "denoise", {"kind": "denoise", "reason": "stalled"}),
    ],
    ids=["busy", "draining", "redis", "lost", "stalled"],
)
def test_a_worker_call_tried_again_is_counted_by_stage_kind_and_reason(redis_url, failure, stage_kind, labels):
    tries: list[str] = []

    async def attempt(channel, worker, timeout: float) -> str:
        tries.append(worker.address)
        if len(tries) == 1:
            raise failure
        return "done"

    before = sample("baton_stage_retries_total", **labels)
    # Two static workers: a call lost on one goes on to the other at once.
    assert call_pool(redis_url, ["127.0.0.1:1", "127.0.0.1:2"], attempt, stage_kind=stage_kind) == "done"
    assert sample("baton_stage_retries_total", **labels) - before == 1


def test_a_call_that_fails_for_good_is_not_counted_as_retried(redis_url):
    async def attempt(channel, worker, timeout: float) -> str:
        raise refusal(grpc.StatusCode.UNAVAILABLE)

    before = sample("baton_stage_retries_total", kind="denoiser", reason="lost")
    with pytest.raises(Unavailable):
        call_pool(redis_url, ["127.0.0.1:1"], attempt, attempts=1)
    assert sample("baton_stage_retries_total", kind="denoiser", reason="lost") == before


def call_pool(redis_url: str, addresses: list[str], attempt, attempts: int = 3, stage_kind: str = ""):
    """WorkerPool.call on denoisers at static `addresses` (nothing listens: `attempt` answers)."""

    async def go():
        registry = WorkerRegistry(connect(redis_url, "no"))
        pool = WorkerPool(registry, {"denoiser": addresses}, 1 << 20, attempts=attempts)
        try:
            return await pool.call("denoiser", attempt, deadline=time.time() + 30, stage_kind=stage_kind)
        finally:
            await pool.close()

    return asyncio.run(go())
