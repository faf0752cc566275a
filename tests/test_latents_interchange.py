"""Latents files between jobs and tools: the multistep scheduler's state travels in the file, so a
split through files is bit-identical to the unsplit run; ComfyUI's .latent is read and written in
raw VAE scale."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from services.client import error_info
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.job_files import read_latents_file, read_latents_with_state, write_output
from services.common.latent_spaces import get_space
from services.common.rules.scheduler import check_solver_history
from services.common.scheduler_caps import capabilities
from tests.gateway_kit import wait_for_job

STEPS = 5
MODELS = {"sd1": "sd1-a", "sdxl": "sdxl-base"}
STATE_HEADER = {"format": "baton.scheduler_state.v1", "class": "DPMSolverMultistepScheduler", "state": {}}


def state_blob() -> bytes:
    tensors = {"model_outputs.0": torch.randn(1, 4, 8, 8), "timestep_list.0": torch.tensor(999)}
    return save(tensors, metadata={"baton": json.dumps(STATE_HEADER)})


def handle(space: str = "sd1") -> pb.LatentHandle:
    return pb.LatentHandle(
        space=space,
        scaling=pb.LATENT_SCALING_MODEL,
        noise=pb.NoiseLevel(fraction=0.6, timestep=400.0),
        scheduler=pb.SchedulerSpec(class_name="DPMSolverMultistepScheduler", steps=5),
        seed=7,
        width=64,
        height=64,
        model="sd1-a",
    )


# -- files, no cluster -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_the_scheduler_state_is_written_beside_the_latents_and_read_back_as_it_was(tmp_path: Path, fmt: str):
    latents, blob = torch.randn(1, 4, 8, 8), state_blob()
    path = write_output(tmp_path / f"l.{fmt}", latents=latents, handle=handle(), scheduler_state=blob)
    tensor, got, state = read_latents_with_state(path)
    assert torch.equal(tensor.torch(), latents) and got.noise.fraction == 0.6
    assert state is not None
    assert json.loads(json.loads(state[8 : 8 + int.from_bytes(state[:8], "little")])["__metadata__"]["baton"]) == (
        STATE_HEADER
    )
    from safetensors.torch import load

    theirs, ours = load(blob), load(state)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_a_safetensors_file_keeps_the_documented_layout_and_dgenerate_s_latents_key(tmp_path: Path):
    path = write_output(tmp_path / "l.safetensors", latents=torch.randn(1, 4, 8, 8), handle=handle(),
                        scheduler_state=state_blob())  # fmt: skip
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["latents", "scheduler_state.model_outputs.0", "scheduler_state.timestep_list.0"]
        assert json.loads(f.metadata()["baton.scheduler_state"])["format"] == "baton.scheduler_state.v1"
        assert f.get_tensor("latents").shape == (1, 4, 8, 8)


def test_a_pt_file_is_plain_tensors_that_torch_loads_without_unpickling_code(tmp_path: Path):
    path = write_output(tmp_path / "l.pt", latents=torch.randn(1, 4, 8, 8), handle=handle(),
                        scheduler_state=state_blob())  # fmt: skip
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"latents", "baton", "scheduler_state"}
    assert set(obj["scheduler_state"]) == {"model_outputs.0", "timestep_list.0"}


def test_a_file_without_state_reads_as_no_state(tmp_path: Path):
    path = write_output(tmp_path / "l.safetensors", latents=torch.randn(1, 4, 8, 8), handle=handle())
    assert read_latents_with_state(path)[2] is None


def test_state_tensors_without_their_header_are_refused_naming_the_key(tmp_path: Path):
    save_file({"latents": torch.randn(1, 4, 8, 8), "scheduler_state.model_outputs.0": torch.randn(1, 4, 8, 8)},
              str(tmp_path / "l.safetensors"))  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"scheduler_state\.\* tensors without their baton\.scheduler_state"):
        read_latents_file(tmp_path / "l.safetensors")


@pytest.mark.parametrize("space", ["sd1", "sdxl", "sd3"])
def test_a_comfyui_latent_file_is_raw_vae_scale_and_round_trips(tmp_path: Path, space: str):
    model = torch.randn(1, get_space(space).channels, 8, 8)
    path = write_output(tmp_path / "l.latent", latents=model, handle=handle(space))
    stored = load_file(str(path))
    assert set(stored) == {"latent_tensor", "latent_format_version_0"}  # ComfyUI's LoadLatent: no legacy rescale
    raw = stored["latent_tensor"]
    s = get_space(space)
    torch.testing.assert_close(raw, model / s.scale + s.shift, rtol=0, atol=1e-6)
    tensor, got = read_latents_file(path)
    assert torch.equal(tensor.torch(), raw)
    assert got.scaling == pb.LATENT_SCALING_RAW and got.space == space
    torch.testing.assert_close(s.to_model(tensor.torch()), model, rtol=0, atol=1e-5)


def test_a_comfyui_file_of_its_own_is_raw_finished_latents_in_the_consuming_model_s_space(tmp_path: Path):
    raw = torch.randn(1, 4, 8, 8)
    save_file({"latent_tensor": raw, "latent_format_version_0": torch.tensor([])}, str(tmp_path / "c.latent"))
    tensor, got = read_latents_file(tmp_path / "c.latent")
    assert torch.equal(tensor.torch(), raw)
    assert (got.scaling, got.space, got.noise.fraction) == (pb.LATENT_SCALING_RAW, "", 1.0)
    save_file({"latent_tensor": raw}, str(tmp_path / "legacy.latent"))  # ComfyUI's legacy: SD 1.x model scale
    assert read_latents_file(tmp_path / "legacy.latent")[1].scaling == pb.LATENT_SCALING_MODEL


def test_the_solver_history_rule_refuses_only_a_multistep_continuation_without_state():
    dpm, euler = capabilities("DPMSolverMultistepScheduler", {}), capabilities("EulerDiscreteScheduler", {})
    with pytest.raises(FailedPrecondition) as refused:
        check_solver_history(dpm, has_state=False, restart=False)
    assert refused.value.field == "latents.scheduler.state" and "restart_solver_history" in refused.value.detail
    check_solver_history(dpm, has_state=False, restart=True)
    check_solver_history(dpm, has_state=True, restart=False)
    check_solver_history(euler, has_state=False, restart=False)  # stateless: nothing to lose


# -- two jobs through a file, on the shared cluster ------------------------------------------------


def job(name: str, stages: list[dict], outputs: list[dict], inputs: list[dict] | None = None) -> jpb.JobSpec:
    body = {"name": name, "seed": 11, "stages": stages, "outputs": outputs, "inputs": inputs or []}
    return json_format.ParseDict(body, jpb.JobSpec())


def denoise(model: str, scheduler: str, **fields) -> dict:
    return {"model": model, "prompt": "a red fox", "steps": STEPS, "scheduler": scheduler, **fields}


def submit(client, spec: jpb.JobSpec, base: Path) -> str:
    """Submits, waiting out UNAVAILABLE while the shared cluster's denoiser is still registering."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit(client.upload_inputs(spec, base)).id
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_all(client, specs: dict[str, jpb.JobSpec], base: Path, out: Path) -> dict[str, jpb.Job]:
    ids = {name: submit(client, spec, base) for name, spec in specs.items()}
    jobs = {}
    for name, job_id in ids.items():
        jobs[name] = wait_for_job(client, job_id)
        assert jobs[name].state == jpb.JOB_STATE_SUCCEEDED, (name, jobs[name].error)
        client.download_outputs(jobs[name], out / name)
    return jobs


CASES = [
    ("sd1", "DPMSolverMultistepScheduler", "safetensors"),
    ("sd1", "UniPCMultistepScheduler", "pt"),
    ("sdxl", "DPMSolverMultistepScheduler", "safetensors"),
    ("sdxl", "UniPCMultistepScheduler", "safetensors"),
]


@pytest.fixture(scope="module")
def first_windows(checked_cluster, tmp_path_factory):
    """Per case: the unsplit run, and the first window written to a file by a job of its own."""
    out = tmp_path_factory.mktemp("interchange")
    specs = {}
    for family, scheduler, fmt in CASES:
        model, tag = MODELS[family], f"{family}-{scheduler[:5]}"
        whole = denoise(model, scheduler, width=64, height=64)
        first = denoise(model, scheduler, width=64, height=64, denoising_end=0.5)
        specs[f"whole-{tag}"] = job(
            "whole", [{"name": "s", "denoise": whole}], [{"stage": "s", "format": "safetensors"}]
        )
        specs[f"first-{tag}"] = job("first", [{"name": "s", "denoise": first}], [{"stage": "s", "format": fmt}])
    with checked_cluster.client() as client:
        run_all(client, specs, out, out)
    return out


@pytest.mark.parametrize(("family", "scheduler", "fmt"), CASES, ids=[f"{c[0]}-{c[1][:5]}-{c[2]}" for c in CASES])
def test_a_multistep_split_through_a_file_equals_the_unsplit_run(
    checked_cluster, first_windows: Path, tmp_path: Path, family: str, scheduler: str, fmt: str
):
    tag = f"{family}-{scheduler[:5]}"
    model, written = MODELS[family], first_windows / f"first-{tag}" / f"s.{fmt}"
    assert read_latents_with_state(written)[2] is not None  # the state is in the file
    second = job("second", [{"name": "t", "denoise": {"model": model, "prompt": "a red fox", "steps": STEPS,
                                                      "latents": "draft"}}],
                 [{"stage": "t", "format": "safetensors"}], [{"name": "draft", "path": str(written)}])  # fmt: skip
    with checked_cluster.client() as client:
        run_all(client, {"second": second}, tmp_path, tmp_path)
    ours, meta = read_latents_file(tmp_path / "second" / "t.safetensors")
    whole, _ = read_latents_file(first_windows / f"whole-{tag}" / "s.safetensors")
    assert meta.scheduler.class_name == scheduler and meta.noise.fraction == 1.0
    assert torch.equal(ours.torch(), whole.torch())


def strip_state(src: Path, dst: Path) -> None:
    """The file as an older Baton wrote it: latents and metadata, no scheduler state."""
    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "baton.scheduler_state"}
        save_file({"latents": f.get_tensor("latents")}, str(dst), metadata=meta)


def test_a_file_without_the_state_is_refused_for_an_exact_continuation_unless_the_solver_restarts(
    checked_cluster, first_windows: Path, tmp_path: Path
):
    strip_state(first_windows / "first-sd1-DPMSo" / "s.safetensors", tmp_path / "old.safetensors")
    body = {"model": "sd1-a", "prompt": "a red fox", "steps": STEPS, "latents": "draft"}
    inputs = [{"name": "draft", "path": str(tmp_path / "old.safetensors")}]
    refused = job("refused", [{"name": "t", "denoise": body}], [{"stage": "t", "format": "safetensors"}], inputs)
    with checked_cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        submit(client, refused, tmp_path)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(error_info(info.value).metadata) == {"stage": "t", "field": "denoise.latents.scheduler.state"}
    assert "restart_solver_history" in info.value.details()

    restarted = job("restarted", [{"name": "t", "denoise": {**body, "restart_solver_history": True}}],
                    [{"stage": "t", "format": "safetensors"}], inputs)  # fmt: skip
    with checked_cluster.client() as client:
        run_all(client, {"restarted": restarted}, tmp_path, tmp_path)
    ours, _ = read_latents_file(tmp_path / "restarted" / "t.safetensors")
    whole, _ = read_latents_file(first_windows / "whole-sd1-DPMSo" / "s.safetensors")
    drift = (ours.torch() - whole.torch()).abs().max().item()
    assert drift > 0  # the history restarts: close, not exact
    torch.testing.assert_close(ours.torch(), whole.torch(), rtol=0, atol=0.5)
