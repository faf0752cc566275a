"""The denoiser under load and on shutdown, as real server subprocesses with a real Redis and tiny models:
a full worker refuses at once and says why, a queued call hears where it stands, and SIGTERM refuses
the queue and hands a running window off with a checkpoint that a new denoiser resumes with the same bits.

Tolerance: bit-exact (torch.equal) between processes with the same settings (reference/tiny_models.md).
"""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.errors import RETRY_TRAILER
from services.common.redis_conn import connect
from services.common.registry import WorkerRegistry
from services.denoiser.checkpoints import blob_name
from tests.denoise_kit import request
from tests.service_procs import ServiceProcess

# Long enough that a 3 s grace period cannot see the window through, even on a fast machine.
WINDOW_STEPS = 20


@pytest.fixture(scope="module")
def store(single_store):
    return single_store


def start_denoiser(redis_url: str, models, log_path) -> ServiceProcess:
    env = {
        "BATON_MODELS": f"sd1={models['sd1']}",
        "BATON_PRELOAD": "sd1",
        "BATON_CONCURRENCY": "1",
        "BATON_MAX_QUEUED": "1",
        "BATON_GRACE_PERIOD": "3",
    }
    return ServiceProcess("denoiser", redis_url, env, log_path).wait_serving()


@pytest.fixture(scope="module")
def denoiser(redis_url, models, tmp_path_factory):
    proc = start_denoiser(redis_url, models, tmp_path_factory.mktemp("logs") / "denoiser.log")
    yield proc
    proc.stop()


def slow_request(**fields) -> dpb.DenoiseRequest:
    """About a second per step on a CPU: 128x128 latents through the tiny UNet with guidance."""
    fields.setdefault("steps", 40)
    return request("sd1", width=256, height=256, **fields)


class Stream:
    """A Denoise call read on a thread of its own: its events as they come, and how it ended."""

    def __init__(self, stub, req: dpb.DenoiseRequest, timeout: float = 300):
        self.call = stub.Denoise(req, timeout=timeout)
        self.events: list[dpb.DenoiseEvent] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except grpc.RpcError as exc:
            self.error = exc

    def wait_for(self, what, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not what(self):
            assert self.thread.is_alive() or what(self), f"the call ended first: {self.error}"
            assert time.monotonic() < deadline, "timed out waiting on the call"
            time.sleep(0.05)

    def join(self, timeout: float = 300) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not end"

    @property
    def steps(self) -> list[dpb.StepEvent]:
        return [e.step for e in self.events if e.HasField("step")]

    @property
    def statuses(self) -> list[dpb.WindowStatus]:
        return [e.status for e in self.events if e.HasField("status")]

    @property
    def result(self) -> dpb.DenoiseResult | None:
        return next((e.result for e in self.events if e.HasField("result")), None)


def retry_hint(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(RETRY_TRAILER, "")


class HealthWatch:
    """Asks the worker's gRPC health every 50 ms and keeps every answer."""

    def __init__(self, channel: grpc.Channel):
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.answers: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.running:
            try:
                reply = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                self.answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.RpcError as exc:
                self.answers.append(exc.code().name)
            time.sleep(0.05)

    def stop(self) -> list[str]:
        self.running = False
        self.thread.join(10)
        return self.answers


def my_record(redis_url: str, address: str):
    return next(w for w in WorkerRegistry(connect(redis_url, "no")).workers("denoiser") if w.address == address)


def test_a_full_denoiser_refuses_at_once_queues_with_status_and_keeps_answering_health(denoiser, redis_url):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser.channel)
    health = HealthWatch(denoiser.channel)
    running = Stream(stub, slow_request())
    running.wait_for(lambda s: s.steps)
    queued = Stream(stub, request("sd1", steps=2))
    queued.wait_for(lambda s: s.statuses)

    refused = Stream(stub, request("sd1", steps=2))
    refused.join()
    assert refused.error is not None and refused.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_hint(refused.error) == "busy"
    assert refused.events == [], "refused before any work"

    deadline = time.monotonic() + 10
    while (record := my_record(redis_url, denoiser.address)).queued != 1:
        assert time.monotonic() < deadline, "the registry never showed the queued call"
        time.sleep(0.1)
    assert (record.in_flight, record.capacity, record.max_queued, record.accepting) == (1, 1, 1, True)

    running.call.cancel()
    queued.join()
    assert queued.error is None and queued.result is not None
    first = queued.events[0].status
    assert (first.phase, first.queue_position) == ("queued", 1)
    phases = [e.status.phase for e in queued.events if e.HasField("status")]
    assert phases[-1] == "preparing" and set(phases) == {"queued", "preparing"}
    last_status = max(i for i, e in enumerate(queued.events) if e.HasField("status"))
    first_step = min(i for i, e in enumerate(queued.events) if e.HasField("step"))
    assert last_status < first_step, "no status events after the first step"
    assert set(health.stop()) == {"SERVING"}


def test_sigterm_refuses_the_queue_hands_the_window_off_and_a_new_denoiser_resumes_it_with_the_same_bits(
    redis_url, models, store, tmp_path_factory
):
    logs = tmp_path_factory.mktemp("drain")
    req = slow_request(steps=WINDOW_STEPS, scheduler="DPMSolverMultistepScheduler", output_key="drain/draft")
    first = start_denoiser(redis_url, models, logs / "first.log")
    try:
        stub = denoiser_pb2_grpc.DenoiserStub(first.channel)
        window = Stream(stub, req)
        window.wait_for(lambda s: len(s.steps) >= 3)
        waiting = Stream(stub, request("sd1", steps=2))
        waiting.wait_for(lambda s: s.statuses)
        first.signal(signal.SIGTERM)  # a 3 s grace period, far shorter than the window
        waiting.join(timeout=10)
        window.join()
        assert first.wait(30) == 0
    finally:
        first.stop()
    assert waiting.error is not None and waiting.error.code() == grpc.StatusCode.UNAVAILABLE
    assert retry_hint(waiting.error) == "draining" and waiting.steps == []
    assert window.error is not None, "the window should not have finished in the grace period"
    assert window.error.code() == grpc.StatusCode.UNAVAILABLE, window.error.details()
    assert retry_hint(window.error) == "draining"
    found = re.search(rf"checkpointed after step (\d+) of {WINDOW_STEPS}", window.error.details())
    assert found, window.error.details()
    handed_off = int(found.group(1))
    assert 3 <= handed_off < WINDOW_STEPS and handed_off == len(window.steps)
    assert store.exists(blob_name("drain/draft"))

    second = start_denoiser(redis_url, models, logs / "second.log")
    try:
        stub = denoiser_pb2_grpc.DenoiserStub(second.channel)
        resumed = Stream(stub, req)
        resumed.join()
        reference = dpb.DenoiseRequest()
        reference.CopyFrom(req)
        reference.output_key = "drain/reference"
        uninterrupted = Stream(stub, reference)
        uninterrupted.join()
    finally:
        second.stop()
    assert resumed.error is None and resumed.result is not None, resumed.error
    assert resumed.result.resumed_from == handed_off
    assert handed_off in [s.resumed_from for s in resumed.statuses]
    assert [s.step for s in resumed.steps] == list(range(handed_off + 1, WINDOW_STEPS + 1))
    assert uninterrupted.result is not None and uninterrupted.result.resumed_from == 0
    ours = store.get_tensor(resumed.result.latents.blob)
    assert torch.equal(ours, store.get_tensor(uninterrupted.result.latents.blob))
    assert not store.exists(blob_name("drain/draft")), "a finished window removes its checkpoint"
