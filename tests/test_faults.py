"""Jobs under load and faults, the way they happen: real processes, real Redis, tiny models.

Two gateways and two denoisers share one cluster (Redis with AOF) for the load, stall,
kill, drain and Redis-restart tests; each test leaves it with two healthy denoisers. A
cluster with one denoiser (no queue of its own) holds jobs in the shared queue for the
tests of queued jobs, and one without persistence shows what a Redis restart loses.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from google.protobuf import json_format

from services.client import BatonClient
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.devkit.cluster import health_status
from tests.gateway_kit import TERMINAL, Cluster, demo_models, wait_for_job, wait_for_progress

# Seconds from freezing a worker to its job succeeding elsewhere: keepalive (10 s pings, 5 s
# timeout) or the 30 s stall floor notices it; then the stage resumes from a checkpoint.
FROZEN_BOUND_S = 60.0


def job(steps: int, side: int = 64, seed: int = 1, scheduler: str = "", **denoise) -> jpb.JobSpec:
    """One sd1 window; at side 256 a step takes about a second on these CPUs."""
    body = {"model": "sd1-a", "prompt": "a lighthouse", "steps": steps, **denoise}
    if scheduler:
        body["scheduler"] = scheduler
    return json_format.ParseDict(
        {"name": "fault", "seed": seed, "width": side, "height": side, "stages": [{"name": "a", "denoise": body}],
         "outputs": [{"stage": "a", "format": "safetensors"}]},
        jpb.JobSpec(),
    )  # fmt: skip


def latents(client: BatonClient, done: jpb.Job) -> torch.Tensor:
    return client.get_tensor(done.outputs[0].latents.blob)


def running_on(client: BatonClient, job_id: str) -> str:
    return client.get(job_id).stages[0].worker


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return demo_models(tmp_path_factory.mktemp("fault-models"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models):
    c = Cluster(
        tmp_path_factory.mktemp("faults"), models, denoisers=2, gateways=2, redis_persistence="aof",
        gateway_env={"BATON_JOB_LEASE": "4"},
        denoiser_env={"BATON_CHECKPOINT_EVERY": "2", "BATON_GRACE_PERIOD": "6"},
    )  # fmt: skip
    yield c
    c.stop()


@pytest.fixture
def client(cluster):
    with cluster.client() as c:
        yield c


@pytest.fixture
def thawed(cluster):
    """Whatever the test froze runs again afterwards."""
    yield
    for d in cluster.denoisers:
        if d.running:
            d.resume()


# -- load ------------------------------------------------------------------------------------
def test_150_concurrent_jobs_through_two_gateways_all_succeed_and_health_never_refuses(cluster):
    seen: set[str] = set()
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            for d in cluster.denoisers:
                seen.add(health_status(d.address, timeout=2.0))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    clients = [BatonClient(g.address) for g in cluster.gateways]
    try:
        with ThreadPoolExecutor(32) as pool:
            submitted = list(pool.map(lambda i: clients[i % 2].submit(job(2, seed=i)), range(150)))
            done = list(pool.map(lambda j: wait_for_job(clients[0], j.id, timeout=300), submitted))
    finally:
        stop.set()
        prober.join()
        for c in clients:
            c.close()
    failed = [(j.id, jpb.JobState.Name(j.state), j.error) for j in done if j.state != jpb.JOB_STATE_SUCCEEDED]
    assert not failed, failed[:5]
    assert seen == {"SERVING"}, seen
    assert max(j.queue_position for j in submitted) > 1, "jobs waited their turn in the shared queue"


# -- workers that freeze, die or drain -------------------------------------------------------
def test_a_frozen_denoiser_is_noticed_and_the_job_finishes_on_the_replica(cluster, client, thawed):
    submitted = client.submit(job(8, side=256))
    wait_for_progress(client, submitted.id, steps=2)
    frozen = next(d for d in cluster.denoisers if d.address == running_on(client, submitted.id))
    frozen.pause()
    start = time.monotonic()
    done = wait_for_job(client, submitted.id, timeout=FROZEN_BOUND_S + 60)
    took = time.monotonic() - start
    frozen.resume()
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
    assert done.stages[0].worker != frozen.address and done.stages[0].attempts == 2
    assert took < FROZEN_BOUND_S, f"took {took:.0f} s"


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_a_killed_denoiser_s_window_resumes_at_its_checkpoint_bit_exactly(cluster, client, scheduler):
    reference = wait_for_job(client, client.submit(job(10, side=192, seed=3, scheduler=scheduler)).id)
    assert reference.state == jpb.JOB_STATE_SUCCEEDED, reference.error
    submitted = client.submit(job(10, side=192, seed=3, scheduler=scheduler))
    head = wait_for_progress(client, submitted.id, steps=5)
    victim = next(d for d in cluster.denoisers if d.address == running_on(client, submitted.id))
    victim.kill()
    done = wait_for_job(client, submitted.id, timeout=240)
    victim.restart()
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
    stage = done.stages[0]
    assert stage.attempts == 2 and 2 <= stage.resumed_from <= 5, (stage.attempts, stage.resumed_from)
    tail = list(client.watch(submitted.id, after_event_id=head[-1].id))
    resumed = [e.progress.step for e in tail if e.WhichOneof("event") == "progress"]
    assert resumed[0] == stage.resumed_from + 1 and resumed[-1] == 10, resumed
    # Both ran in denoiser processes of one configuration: equal bit for bit.
    assert torch.equal(latents(client, done), latents(client, reference))


def test_sigterm_each_denoiser_in_turn_while_jobs_stream_in_fails_no_job(cluster, client):
    submitted: list[jpb.Job] = []
    stop = threading.Event()

    def stream() -> None:
        """Keeps about four jobs in flight: short ones, and long ones that outlast a drain."""
        i = 0
        while not stop.is_set():
            unfinished = [j for j in submitted[-8:] if client.get(j.id).state not in TERMINAL]
            if len(unfinished) < 4:
                steps, side = (24, 192) if i % 2 else (6, 128)
                submitted.append(client.submit(job(steps, side=side, seed=i)))
                i += 1
            time.sleep(0.3)

    def starting_a_long_window(candidates: list) -> object:
        """The first of `candidates` seen in the first half of a long window, past its first checkpoint,
        of a job no earlier drain picked: its drain must hand that one off (so each drain adds a job
        to `handed_off`, rather than the second draining the window the first one moved there).

        Placement prefers the denoiser that holds the model, so which one runs the long
        windows is the cluster's choice; the test drains whichever does, then the other.
        """
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for j in list(submitted[-8:]):  # the feeder keeps the ones in flight among the last few
                stage = client.get(j.id).stages[0]
                for denoiser in candidates:
                    # Step 2 onwards: the window has a checkpoint (every 2 steps) to be handed off from.
                    long_and_early = stage.total == 24 and 2 <= stage.step <= 12
                    if stage.worker == denoiser.address and long_and_early and j.id not in drained_jobs:
                        drained_jobs.add(j.id)
                        return denoiser
            time.sleep(0.1)
        raise AssertionError(f"none of {[d.address for d in candidates]} started a long window")

    feeder = threading.Thread(target=stream)
    feeder.start()
    undrained = list(cluster.denoisers)
    drained_jobs: set[str] = set()
    try:
        while undrained:
            denoiser = starting_a_long_window(undrained)
            undrained.remove(denoiser)
            denoiser.signal(signal.SIGTERM)
            assert denoiser.wait(30) == 0, denoiser.log_tail()
            denoiser.restart()
    finally:
        stop.set()
        feeder.join()
    done = [wait_for_job(client, j.id, timeout=300) for j in submitted]
    failed = [(j.id, j.error) for j in done if j.state != jpb.JOB_STATE_SUCCEEDED]
    assert not failed, failed
    handed_off = [j for j in done if j.stages[0].resumed_from > 0]
    assert len(handed_off) >= 2, "each drain handed its long window off from a checkpoint"


# -- Redis -----------------------------------------------------------------------------------
def gateway_calls(address: str, job_id: str, blob: pb.BlobHandle) -> dict[str, object]:
    """Every gateway RPC once, each with a 10 s deadline: the status it failed with (or what it returned)."""
    with BatonClient(address, timeout=10) as short:
        calls = {
            "Submit": lambda: short.submit(job(2)),
            "Get": lambda: short.get(job_id),
            "List": lambda: list(short.list(page_size=5)),
            "Cancel": lambda: short.cancel(job_id),
            "Watch": lambda: list(short.stub.Watch(gpb.WatchRequest(job_id=job_id), timeout=10)),
            "PutBlob": lambda: short.put_bytes(b"x", "application/octet-stream"),
            "GetBlob": lambda: short.get_bytes(blob),
        }
        out: dict[str, object] = {}
        for name, call in calls.items():
            try:
                out[name] = call()
            except grpc.RpcError as exc:
                out[name] = exc.code()
    return out


def test_a_running_job_survives_redis_killed_and_restarted_with_aof(cluster, client):
    blob = wait_for_job(client, client.submit(job(2)).id).outputs[0].latents.blob
    submitted = client.submit(job(10, side=192))
    wait_for_progress(client, submitted.id, steps=2)
    cluster.redis.kill()
    try:
        start = time.monotonic()
        while {health_status(p.address) for p in [*cluster.gateways, *cluster.denoisers]} != {"NOT_SERVING"}:
            assert time.monotonic() - start < 10, "health still SERVING without Redis"
            time.sleep(0.1)
        codes = {g.name: gateway_calls(g.address, submitted.id, blob) for g in cluster.gateways}
    finally:
        cluster.redis.restart()
    assert {code for calls in codes.values() for code in calls.values()} == {grpc.StatusCode.UNAVAILABLE}, codes
    done = wait_for_job(client, submitted.id, timeout=240)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
    start = time.monotonic()
    while {health_status(p.address) for p in [*cluster.gateways, *cluster.denoisers]} != {"SERVING"}:
        assert time.monotonic() - start < 15, "health did not come back with Redis"
        time.sleep(0.1)


def test_with_redis_frozen_rpcs_fail_within_their_deadline(cluster, client):
    finished = wait_for_job(client, client.submit(job(2)).id)
    cluster.redis.pause()
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            BatonClient(cluster.gateway.address, timeout=10).get(finished.id)
        took = time.monotonic() - start
    finally:
        cluster.redis.resume()
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert took < 10.5


@pytest.fixture
def volatile(tmp_path, models):
    c = Cluster(tmp_path, models, gateway_env={"BATON_JOB_LEASE": "4"})
    yield c
    c.stop()


def test_without_persistence_a_redis_restart_fails_the_job_naming_its_lost_record(volatile):
    with volatile.client() as client:
        submitted = client.submit(job(10, side=192))
        wait_for_progress(client, submitted.id, steps=2)
        volatile.redis.kill()
        time.sleep(1)
        volatile.redis.restart()
        done = wait_for_job(client, submitted.id, timeout=120)
    assert done.state == jpb.JOB_STATE_FAILED
    assert "record was lost" in done.error and "persistence" in done.error, done.error


# -- queued jobs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def narrow(tmp_path_factory, models):
    """One denoiser that takes one window and queues none: jobs behind a running one wait in the shared queue."""
    c = Cluster(tmp_path_factory.mktemp("narrow"), models, denoiser_env={"BATON_MAX_QUEUED": "0"})
    yield c
    c.stop()


def test_cancel_of_a_queued_job_after_its_gateway_was_killed_ends_it_cancelled_unrun(narrow):
    with BatonClient(narrow.gateway.address) as b:
        blocker = b.submit(job(30, side=256))  # runs on this gateway, holding the denoiser
        wait_for_progress(b, blocker.id, steps=1)
        other = narrow.start_gateway()
        with BatonClient(other.address) as a:
            queued = a.submit(job(2))
            assert a.get(queued.id).state == jpb.JOB_STATE_QUEUED and queued.queue_position == 1
        other.kill()
        cancelled = b.cancel(queued.id, "not needed")
        assert cancelled.state == jpb.JOB_STATE_CANCELLED and cancelled.error == "not needed"
        b.cancel(blocker.id)
        time.sleep(3)  # the denoiser is free: a job still queued would run now
        final = b.get(queued.id)
    assert final.state == jpb.JOB_STATE_CANCELLED and final.stages[0].attempts == 0


def test_an_expired_queued_job_leaves_the_active_set_with_one_log_line(narrow):
    import redis

    with BatonClient(narrow.gateway.address) as client:
        blocker = client.submit(job(30, side=256))
        wait_for_progress(client, blocker.id, steps=1)
        queued = client.submit(job(2))
        r = redis.Redis.from_url(narrow.redis_url)
        r.pexpire(f"baton:job:{{{queued.id}}}", 1)  # its retention ends while it waits
        start = time.monotonic()
        while r.sismember("baton:jobs:active", queued.id):
            assert time.monotonic() - start < 15, "the expired job stayed active"
            time.sleep(0.2)
        client.cancel(blocker.id)
    lines = [line for g in narrow.gateways for line in g.log_tail(10_000).splitlines() if queued.id in line]
    assert len([line for line in lines if "expired" in line]) == 1, lines
    assert r.zscore("baton:queue", queued.id) is None


def test_the_only_denoiser_killed_and_back_within_10_s_the_job_succeeds(narrow):
    with BatonClient(narrow.gateway.address) as client:
        submitted = client.submit(job(6, side=256))
        wait_for_progress(client, submitted.id, steps=1)
        denoiser = narrow.denoisers[0]
        denoiser.kill()
        time.sleep(3)
        denoiser.restart()
        done = wait_for_job(client, submitted.id, timeout=180)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
    assert done.stages[0].attempts == 2


def test_watch_after_the_last_event_of_a_finished_job_ends_at_once(narrow):
    from services.cli.main import main

    with BatonClient(narrow.gateway.address) as client:
        done = wait_for_job(client, client.submit(job(2)).id)
        last = list(client.watch(done.id))[-1].id
    start = time.monotonic()
    code = main(["watch", done.id, "--after", last, "--gateway", narrow.gateway.address])
    assert code == 0 and time.monotonic() - start < 1.0
