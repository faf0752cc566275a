"""The client and the CLI's client verbs as a client-only install runs them: no torch, one-line
errors with documented exit codes, files that round-trip exactly, PNGs that say how they were made."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from google.protobuf import json_format
from PIL import Image

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.job_files import read_latents_file
from tests.gateway_kit import wait_for_job

REPO = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("torch", "diffusers", "transformers", "accelerate", "redis", "xxhash", "prometheus_client", "scipy")
# Every verb a client uses, and the arguments that make it call the gateway.
CLIENT_VERBS = {
    "ls": [],
    "get": ["JOB"],
    "cancel": ["JOB"],
    "watch": ["JOB"],
    "submit": ["SPEC"],
    "run": ["SPEC", "--quiet", "--out", "OUT"],
    "models": [],
    "processors": [],
    "schedulers": [],
    "workers": [],
    "batch": ["SPEC", "--rows", "ROWS", "--manifest", "MANIFEST"],
}


def baton(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI with the server's packages unimportable (tests/no_torch.py), as after `pip install baton`."""
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "no_torch.py"), "services.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_file(path: Path, stages: list[dict], outputs: list[dict], inputs: list[dict] | None = None) -> Path:
    spec = {"name": path.stem, "seed": 7, "width": 64, "height": 64, "stages": stages, "outputs": outputs}
    if inputs:
        spec["inputs"] = inputs
    path.write_text(yaml.safe_dump(spec))
    return path


def denoise(model: str, **window) -> dict:
    body = {"model": model, "prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 4}
    return {**body, "guidance_scale": 5.0, "scheduler": "EulerDiscreteScheduler", **window}


def test_the_client_verbs_import_no_torch():
    code = (
        "import sys\n"
        "import services.cli.main as m\n"
        "m.build_parser()\n"  # imports every verb module
        "import services.client, services.client.batch, services.client.png_info, services.common.job_files\n"
        "import services.cli.progress, services.cli.outcome\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({SERVER_ONLY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pyproject_s_own_dependencies_bring_no_torch():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert not names & {"torch", "diffusers", "transformers", "accelerate", "redis", "scipy"}
    assert {"torch", "diffusers"} <= {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"]["server"]}


@pytest.mark.parametrize("verb", sorted(CLIENT_VERBS))
def test_each_verb_says_in_one_line_that_nothing_listens(verb: str, tmp_path: Path):
    spec = spec_file(tmp_path / "job.yaml", [{"name": "a", "denoise": denoise("sd1-a")}], [])
    (tmp_path / "rows.jsonl").write_text('{"seed": 1}\n')
    fill = {"JOB": "0" * 32, "SPEC": str(spec), "ROWS": str(tmp_path / "rows.jsonl"), "OUT": str(tmp_path / "out")}
    fill["MANIFEST"] = str(tmp_path / "m.jsonl")
    args = [fill.get(a, a) for a in CLIENT_VERBS[verb]]
    result = baton(verb, *args, "--gateway", f"127.0.0.1:{free_port()}", timeout=60)
    assert "Traceback" not in result.stderr
    assert result.returncode == 3, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith(f"baton {verb}: "))
    assert line.startswith(f"baton {verb}: UNAVAILABLE: nothing answers at 127.0.0.1:")
    assert "baton up" in line


@pytest.mark.parametrize("verb", ["get", "cancel", "watch"])
def test_an_unknown_job_is_one_line_and_exit_2(verb: str, checked_cluster):
    result = baton(verb, "f" * 32, "--gateway", checked_cluster.gateway.address)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"baton {verb}: NOT_FOUND: field 'job_id': job '{'f' * 32}' does not exist or has expired; "
        "`baton ls` lists your jobs"
    ]


def test_a_bad_spec_is_one_line_and_exit_2(tmp_path: Path, checked_cluster):
    spec = spec_file(tmp_path / "job.yaml", [{"name": "a", "denoise": {**denoise("sd1-a"), "steps": -3}}], [])
    result = baton("submit", str(spec), "--gateway", checked_cluster.gateway.address)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("baton submit: INVALID_ARGUMENT: ") and "steps" in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path):
    result = baton("--debug", "ls", "--gateway", f"127.0.0.1:{free_port()}")
    assert result.returncode == 3 and "Traceback" in result.stderr


def test_a_split_through_files_without_torch_equals_the_job_in_one_piece(tmp_path: Path, checked_cluster):
    """Stage 1 as a job, its latents file downloaded and uploaded again by the torch-free CLI, stage 2
    as a second job: the result is the one-job run's, bit for bit (Euler is first order)."""
    gateway = checked_cluster.gateway.address
    draft, finish = denoise("sd1-a", denoising_end=0.5), denoise("sd1-b", denoising_start=0.5, latents="draft")
    one = spec_file(
        tmp_path / "one.yaml",
        [{"name": "draft", "denoise": draft}, {"name": "finish", "denoise": finish}],
        [{"stage": "finish", "format": "safetensors"}],
    )
    first = spec_file(
        tmp_path / "first.yaml", [{"name": "draft", "denoise": draft}], [{"stage": "draft", "format": "safetensors"}]
    )
    second = spec_file(
        tmp_path / "second.yaml",
        [{"name": "finish", "denoise": finish}, {"name": "picture", "decode": {"latents": "finish"}}],
        [{"stage": "finish", "format": "safetensors"}, {"stage": "picture", "format": "png"}],
        inputs=[{"name": "draft", "path": "d1/draft.safetensors"}],
    )  # fmt: skip
    with checked_cluster.client() as client:
        ids = {}
        for name, spec in (("one", one), ("first", first)):
            result = baton("submit", str(spec), "--gateway", gateway)
            assert result.returncode == 0, result.stderr
            ids[name] = result.stdout.strip()
        for name, out in (("one", "d0"), ("first", "d1")):
            assert wait_for_job(client, ids[name]).state == jpb.JOB_STATE_SUCCEEDED
            got = baton("get", ids[name], "--out", str(tmp_path / out), "--gateway", gateway)
            assert got.returncode == 0, got.stderr
            assert json.loads(got.stdout)["id"] == ids[name]  # stdout is the record alone
            assert "wrote " in got.stderr
        result = baton("submit", str(second), "--gateway", gateway, cwd=tmp_path)  # the input path is relative
        assert result.returncode == 0, result.stderr
        job = wait_for_job(client, result.stdout.strip())
        assert job.state == jpb.JOB_STATE_SUCCEEDED, job.error
        assert baton("get", job.id, "--out", str(tmp_path / "d2"), "--gateway", gateway).returncode == 0
    whole, _ = read_latents_file(tmp_path / "d0" / "finish.safetensors")
    split, meta = read_latents_file(tmp_path / "d2" / "finish.safetensors")
    assert torch.equal(split.torch(), whole.torch())
    assert meta.space == "sd1" and meta.noise.fraction == 1.0

    with Image.open(tmp_path / "d2" / "picture.png") as image:
        text = dict(image.text)
    assert text["baton.job_id"] == job.id and text["baton.stage"] == "picture"
    assert text["baton.model"] == "sd1-b" and text["baton.seed"] == "7" and text["baton.steps"] == "4"
    assert text["baton.prompt"] == "a red fox in the snow"
    assert json_format.ParseDict(json.loads(text["baton.spec"]), jpb.JobSpec()) == job.spec
    prompt, negative, pairs = text["parameters"].split("\n")
    assert prompt == "a red fox in the snow" and negative == "Negative prompt: blurry"
    assert "Steps: 4, Sampler: EulerDiscreteScheduler, CFG scale: 5, Seed: 7, Size: 64x64, Model: sd1-b" in pairs


def test_the_readme_client_example_runs_without_torch_and_prints_states(tmp_path: Path, checked_cluster):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The Python client and the CLI without torch") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")].replace('Path("out")', f"Path({str(tmp_path / 'out')!r})")
    (tmp_path / "example.py").write_text(code)
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "no_torch.py"), "runpy_file", str(tmp_path / "example.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "BATON_GATEWAY": checked_cluster.gateway.address},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "draft: step 1/" in lines[0] and any(ln.endswith("JOB_STATE_SUCCEEDED ") for ln in lines)
    assert lines[-1] == f"wrote {tmp_path / 'out' / 'picture.png'}"
    assert len(lines) < 60  # states and steps, not protobuf dumps
