"""Generated specs against a live gateway: whatever a client sends, the answer is a job or a
refusal that names its field, never INTERNAL or UNKNOWN, and the gateway keeps serving.

The gateway runs no job (max-running-jobs 0), so accepted specs only queue: the test is of what
Submit says, at a rate a batch pipeline could send."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.client import error_info, field_violations
from services.common.api.baton.v1 import jobs_pb2 as jpb
from tests.gateway_kit import Cluster, demo_models

EXAMPLES = 1000
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    c = Cluster(
        root,
        demo_models(root / "models"),
        gateway_env={"BATON_MAX_RUNNING_JOBS": "0"},
        processor_env={},
        interposer_env={},
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with cluster.client() as c:
        yield c


def odd(*values):
    """Sensible values, edge values and absurd ones, as a user or a broken program sends them."""
    return st.sampled_from(values)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), odd(0.0, 0.3, 0.5, 0.6, 1.0, 1.5, -1.0, 1e308, 7.5))
sizes = odd(0, 8, 63, 64, 96, 128, 1024, 2048, 8192, -64)
names = odd("a", "b", "c", "", "x" * 300, "a/b", "{a}")
schedulers = odd(
    "",
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "euler",
    "EulerAncestralDiscreteScheduler",
    "DDIMInverseScheduler",
    "Nope",
    "x" * 1000,
)
configs = odd(
    {},
    {"algorithm_type": "sde-dpmsolver++"},
    {"use_karras_sigmas": True},
    {"use_karras_sigma": 1},
    {"shift": 3.0},
    {"beta_start": {"a": 1}},
)
processors = odd(
    "scale;factor=2",
    "scale;factor=NaN",
    "scale;factor=1e400",
    "scale;device=meta",
    "scale;device=cuda:1",
    "noise;strength=0.3",
    "nope",
    ";",
    "scale;;factor",
    "scale;factor=1;factor=2",
    "+",
    "blend",
)


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def denoise(draw) -> dict:
    body = {
        "model": draw(odd("sd1-a", "sd1-b", "sdxl-base", "nope", "")),
        "steps": draw(st.one_of(st.integers(-3, 1200), odd(2, 100000))),
        "prompt": draw(st.one_of(st.text(max_size=30), odd("x" * 25000))),
        "width": draw(sizes),
        "height": draw(sizes),
        "num_images": draw(st.integers(-2, 70)),
        "scheduler": draw(schedulers),
        "guidance_scale": draw(optional(floats)),
        "guidance_rescale": draw(optional(floats)),
        "denoising_start": draw(optional(floats)),
        "denoising_end": draw(optional(floats)),
        "strength": draw(optional(floats)),
        "latents": draw(optional(names)),
        "image": draw(optional(odd("picture", "a", "nope"))),
        "mask": draw(optional(odd("picture", "nope"))),
        "scheduler_config": draw(optional(configs)),
        "max_sequence_length": draw(optional(st.integers(-1, 600))),
        "preview_every": draw(optional(st.integers(-2, 3))),
        "latents_processors": draw(optional(st.lists(processors, max_size=2))),
    }
    return {k: v for k, v in body.items() if v is not None}


@st.composite
def stage(draw) -> dict:
    kind = draw(odd("denoise", "denoise", "process", "decode", "interpose", "encode"))
    if kind == "denoise":
        body = draw(denoise())
    elif kind == "process":
        body = {"latents": draw(names), "processors": draw(st.lists(processors, max_size=3))}
    elif kind == "decode":
        body = {"latents": draw(names), "model": draw(odd("", "sd1-a", "nope"))}
    elif kind == "interpose":
        body = {"latents": draw(names), "target": draw(odd("sdxl", "sd1", "nope", ""))}
    else:
        body = {"image": draw(odd("picture", "a", "nope")), "model": draw(odd("sd1-a", "nope"))}
    return {"name": draw(names), kind: body}


@st.composite
def specs(draw) -> dict:
    return {
        "name": "fuzz",
        "timeout_s": draw(st.one_of(floats, odd(0.0, 30.0, 1e10))),
        "width": draw(sizes),
        "height": draw(sizes),
        "stages": draw(st.lists(stage(), min_size=0, max_size=3)),
        "outputs": draw(
            st.lists(st.fixed_dictionaries({"stage": names, "format": odd("png", "pt", "gif", "")}), max_size=2)
        ),
        "inputs": draw(odd([], [{"name": "picture", "blob": {"key": "baton:blob:{nope}", "media_type": "image/png"}}])),
    }


def as_spec(data: dict) -> jpb.JobSpec:
    def clean(value):  # protobuf's JSON mapping spells non-finite numbers as strings
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    try:
        return json_format.ParseDict(clean(data), jpb.JobSpec())
    except json_format.ParseError:
        assume(False)  # not a JobSpec at all (an int32 out of range): the client library refuses it
        raise


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(specs())
def test_every_generated_spec_is_accepted_or_refused_naming_a_field(client, data):
    spec = as_spec(data)
    try:
        job = client.submit(spec)
    except grpc.RpcError as exc:
        assert exc.code() in REFUSALS, (exc.code(), exc.details(), data)
        info = error_info(exc)
        assert info is not None and info.metadata.get("field"), (exc.details(), data)
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            assert field_violations(exc), (exc.details(), data)
        assert len(exc.details()) <= 1100
    else:
        assert job.state == jpb.JOB_STATE_QUEUED


def test_the_gateway_still_serves_after_the_generated_specs(cluster, client):
    with grpc.insecure_channel(cluster.gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    job = as_spec({"name": "ok", "stages": [{"name": "a", "denoise": {"model": "sd1-a", "prompt": "x", "steps": 2}}]})
    assert client.submit(job).state == jpb.JOB_STATE_QUEUED
