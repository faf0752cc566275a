"""Errors that programs can read: google.rpc details on every refusal, bounded texts, malformed
requests as INVALID_ARGUMENT, and pickled weights refused with how to convert them."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from services.client import error_info, field_violations
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc, processor_pb2, processor_pb2_grpc
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import (
    ELLIPSIS,
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    RETRY_TRAILER,
    InvalidArgument,
    PickledWeights,
    elide,
)
from services.denoiser.models import LoadOptions, inspect_model, load_model
from services.devkit.cluster import ServiceProcess
from services.devkit.tiny_models import build
from services.interposer.weights import WeightsLocator
from tests.gateway_kit import wait_for_job
from tests.service_procs import REPO

# What a gRPC peer accepts in trailers before refusing them (8 KiB soft limit; 16 KiB hard).
METADATA_LIMIT = 8 << 10
GARBAGE = b"\xff\xff\xff\xff\xff"


@pytest.fixture(scope="module")
def probe(redis_url, tmp_path_factory):
    """tests/probe_service.py, a service whose Process RPC raises the error it is told to."""
    log = tmp_path_factory.mktemp("probe") / "probe.log"
    p = ServiceProcess("probe", redis_url, {}, module="tests.probe_service", log=log, cwd=REPO).start()
    yield p.wait_serving(timeout=30)
    p.stop(grace=0)


def probe_call(probe: ServiceProcess, command: str):
    stub = processor_pb2_grpc.ProcessorStub(probe.channel)
    return stub.Process(processor_pb2.ProcessRequest(processors=[command]), timeout=30)


def spec(name: str = "draft", steps: int = 2) -> jpb.JobSpec:
    return json_format.ParseDict(
        {"name": "details", "seed": 1, "width": 64, "height": 64,
         "stages": [{"name": name, "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": steps}}]},
        jpb.JobSpec(),
    )  # fmt: skip


def refusal(checked_cluster, job: jpb.JobSpec) -> grpc.RpcError:
    with checked_cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.submit(job)
    return info.value


def trailer_bytes(error: grpc.RpcError) -> int:
    return sum(len(k) + len(v) for k, v in error.trailing_metadata() or ())


# -- details ---------------------------------------------------------------------------------
def test_an_invalid_spec_names_its_stage_and_field_in_bad_request(checked_cluster):
    error = refusal(checked_cluster, spec(steps=0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    [violation] = field_violations(error)
    assert violation.field == "stages[draft].denoise.steps"
    assert "steps" in violation.description and violation.description in error.details()
    info = error_info(error)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "baton.dev")
    assert dict(info.metadata) == {"stage": "draft", "field": "denoise.steps"}


def test_a_field_rooted_at_the_job_is_not_put_under_its_stage():
    error = InvalidArgument("unknown format", stage="draft", field="outputs[1].format")
    assert error.field_path() == "outputs[1].format"
    assert InvalidArgument("bad", stage="draft").field_path() == "stages[draft]"
    assert InvalidArgument("bad", field="inputs[0].blob").field_path() == "inputs[0].blob"


def test_an_error_without_a_field_still_carries_error_info(checked_cluster):
    with checked_cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.get("no-such-job")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(info.value).domain == "baton.dev"
    assert field_violations(info.value) == []


@pytest.mark.parametrize("error", ["FailedPrecondition", "InvalidArgument"])
def test_a_field_error_from_any_service_carries_bad_request(probe, error):
    with pytest.raises(grpc.RpcError) as info:
        probe_call(probe, f"raise:{error}")
    [violation] = field_violations(info.value)
    assert (violation.field, violation.description) == ("stages[probe].processors", "probe says no")
    assert dict(error_info(info.value).metadata) == {"stage": "probe", "field": "processors"}


def test_a_retry_hint_is_in_error_info_beside_the_baton_retry_trailer(probe):
    with pytest.raises(grpc.RpcError) as info:
        probe_call(probe, "raise:Busy")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata())[RETRY_TRAILER] == "busy"
    assert (error_info(info.value).reason, error_info(info.value).metadata["retry"]) == ("BUSY", "busy")
    assert field_violations(info.value) == []  # nothing in the request to change


def test_a_bug_is_internal_with_error_info(probe):
    with pytest.raises(grpc.RpcError) as info:
        probe_call(probe, "crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(info.value).reason == "INTERNAL"


def test_a_failed_precondition_from_a_worker_carries_details(checked_cluster, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"weight": torch.zeros(1)}, checkpoint)
    stub = denoiser_pb2_grpc.DenoiserStub(checked_cluster.denoisers[0].channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.InspectModel(dpb.InspectModelRequest(model=str(checkpoint)), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [violation] = field_violations(info.value)
    assert violation.field == "model" and "safetensors" in violation.description
    assert error_info(info.value).reason == "PICKLED_WEIGHTS"


# -- bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s" * 100_000, "\u732b" * 34_000], ids=["ascii", "multibyte"])
def test_a_100_kb_stage_name_is_still_invalid_argument_with_bounded_texts(checked_cluster, name):
    error = refusal(checked_cluster, spec(name=name, steps=0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details().encode()) <= MAX_MESSAGE_BYTES and ELLIPSIS in error.details()
    [violation] = field_violations(error)
    assert violation.field.startswith(f"stages[{name[:10]}") and violation.field.endswith("].denoise.steps")
    assert len(error_info(error).metadata["stage"].encode()) <= MAX_NAME_BYTES
    assert trailer_bytes(error) < METADATA_LIMIT


@given(st.text(st.characters(exclude_characters=ELLIPSIS, codec="utf-8")), st.integers(min_value=3, max_value=200))
def test_elided_text_fits_its_bound_and_keeps_both_ends(text, limit):
    short = elide(text, limit)
    assert len(short.encode()) <= limit
    if len(text.encode()) <= limit:
        assert short == text
    else:
        head, _, tail = short.partition(ELLIPSIS)
        assert text.startswith(head) and text.endswith(tail)


# -- malformed requests ----------------------------------------------------------------------
def _send_garbage(channel: grpc.Channel, method: str, kind: str) -> grpc.RpcError:
    call = getattr(channel, kind)(method)  # no serializers: bytes go out as they are
    request = iter([GARBAGE]) if kind.startswith("stream") else GARBAGE
    with pytest.raises(grpc.RpcError) as info:
        reply = call(request, timeout=10)
        if kind.endswith("stream"):
            list(reply)
    return info.value


@pytest.mark.parametrize(
    "method,kind",
    [
        ("/baton.v1.Gateway/Submit", "unary_unary"),
        ("/baton.v1.Gateway/Watch", "unary_stream"),
        ("/baton.v1.Gateway/PutBlob", "stream_unary"),
        ("/grpc.health.v1.Health/Check", "unary_unary"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ],
)
def test_wire_garbage_is_invalid_argument_naming_the_message_it_is_not(checked_cluster, method, kind):
    error = _send_garbage(checked_cluster.gateway.channel, method, kind)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "malformed request" in error.details() and method in error.details()
    assert error_info(error).reason == "MALFORMED_REQUEST"


def test_the_gateway_keeps_serving_after_wire_garbage(checked_cluster):
    _send_garbage(checked_cluster.gateway.channel, "/baton.v1.Gateway/Submit", "unary_unary")
    health = health_pb2_grpc.HealthStub(checked_cluster.gateway.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with checked_cluster.client() as client:
        job = client.submit(spec())
        assert wait_for_job(client, job.id).state == jpb.JOB_STATE_SUCCEEDED


# -- pickled weights -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickled_folder(tmp_path_factory) -> Path:
    """A tiny SD 1.x folder re-saved with pickled (.bin) weights."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("pickled")
    pipe = StableDiffusionPipeline.from_pretrained(build("sd1", root / "safe"))
    pipe.save_pretrained(root / "pickled", safe_serialization=False)
    return root / "pickled"


def _assert_says_how_to_convert(error: PickledWeights, *names: str) -> None:
    assert error.code == "FAILED_PRECONDITION" and error.field == "model"
    message = str(error)
    assert "safetensors" in message and "weights_only" not in message
    assert all(name in message for name in names)


def test_a_diffusers_folder_with_pickled_weights_is_refused_naming_the_file(pickled_folder):
    assert list(pickled_folder.glob("*/*.bin")), "the fixture saved pickles"
    with pytest.raises(PickledWeights) as info:
        load_model("pickled", str(pickled_folder), LoadOptions())
    _assert_says_how_to_convert(info.value, "diffusion_pytorch_model.bin", "safe_serialization=True")
    with pytest.raises(PickledWeights):
        inspect_model("pickled", str(pickled_folder), LoadOptions())


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_a_pickled_single_file_checkpoint_is_refused_with_how_to_convert(tmp_path, suffix):
    checkpoint = tmp_path / f"model{suffix}"
    torch.save({"weight": torch.zeros(1)}, checkpoint)
    with pytest.raises(PickledWeights) as info:
        load_model("pickled", str(checkpoint), LoadOptions())
    _assert_says_how_to_convert(info.value, checkpoint.name, "model.safetensors", "save_file")


def test_pickled_interposer_weights_are_refused_with_how_to_convert(tmp_path):
    pickled = tmp_path / "v1-to-xl_interposer-v4.0.pth"
    torch.save({"weight": torch.zeros(1)}, pickled)
    with pytest.raises(PickledWeights) as info:
        WeightsLocator(str(tmp_path)).find("v1", "xl")
    message = str(info.value)
    assert pickled.name in message and "v1-to-xl_interposer-v4.0.safetensors" in message
    assert "weights_only" not in message
