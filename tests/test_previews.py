"""`baton run` and `baton watch` as a user runs them, against a real cluster: step previews
written as files, watch's one-line failures, and Ctrl-C in watch leaving the job running."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from google.protobuf import json_format
from PIL import Image

from services.client import BatonClient
from services.common.api.baton.v1 import jobs_pb2 as jpb
from tests.gateway_kit import wait_for_job
from tests.service_procs import REPO

SPEC = """\
name: previews
seed: 1
width: 64
height: 64
stages:
  - name: base
    denoise: {model: sd1-a, prompt: a cat, steps: 6}
  - name: picture
    decode: {latents: base}
outputs:
  - {stage: picture, format: png}
"""
PREVIEWS = ["step-002.png", "step-004.png", "step-006.png"]  # every 2nd step and the last


def baton(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATON_GATEWAY", "BATON_DEBUG")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def ran(checked_cluster, tmp_path_factory):
    """One `baton run --previews DIR --preview-every 2` of a 6-step stage: (job, its output, DIR)."""
    root = tmp_path_factory.mktemp("previews")
    (root / "job.yaml").write_text(SPEC)
    address = checked_cluster.gateway.address
    result = baton("run", str(root / "job.yaml"), "--gateway", address, "--out", str(root / "out"),
                   "--previews", str(root / "previews"), "--preview-every", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    job_id = next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("job "))
    with BatonClient(address) as client:
        job = client.get(job_id)
    return job, result, root / "previews"


def test_run_writes_each_preview_as_a_png_of_the_latents_size(ran):
    job, result, previews = ran
    assert sorted(p.name for p in (previews / "base").iterdir()) == PREVIEWS
    base = next(s for s in job.stages if s.name == "base")
    height, width = base.latents.blob.shape[-2:]
    for name in PREVIEWS:
        with Image.open(previews / "base" / name) as image:
            assert (image.format, image.size) == ("PNG", (width, height))
    assert f"wrote 3 previews under {previews}" in result.stdout


def test_run_prints_plain_progress_lines_when_stderr_is_not_a_terminal(ran):
    _, result, _ = ran
    assert "\r" not in result.stderr
    assert "stage base done in " in result.stderr and "6 steps" in result.stderr
    assert f"job {ran[0].id}: succeeded" in result.stdout


def test_watch_after_the_job_ended_writes_the_same_previews_from_its_event_stream(ran, checked_cluster, tmp_path):
    job, _, previews = ran
    result = baton("watch", job.id, "--gateway", checked_cluster.gateway.address, "--previews", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in PREVIEWS:
        assert (tmp_path / "base" / name).read_bytes() == (previews / "base" / name).read_bytes()


def test_watch_events_give_a_preview_as_its_size_and_path_never_as_base64(ran, checked_cluster, tmp_path):
    job, _, _ = ran
    result = baton("watch", job.id, "--events", "--gateway", checked_cluster.gateway.address,
                   "--previews", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    steps = [e["progress"] for e in map(json.loads, result.stdout.splitlines()) if "progress" in e]
    with_preview = [s for s in steps if "preview_bytes" in s]
    assert [Path(s["preview_path"]).name for s in with_preview] == PREVIEWS
    assert all(s["preview_bytes"] == Path(s["preview_path"]).stat().st_size for s in with_preview)
    assert "preview_png" not in result.stdout


def test_watch_of_an_unknown_job_says_so_in_one_line_and_exits_2(checked_cluster):
    result = baton("watch", "no-such-job", "--gateway", checked_cluster.gateway.address, timeout=30)
    assert result.returncode == 2
    assert "baton watch: NOT_FOUND" in one_line_failure(result)


def test_watch_where_nothing_listens_says_so_in_one_line_and_exits_3():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = baton("watch", "some-job", "--gateway", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode == 3
    assert "baton watch: UNAVAILABLE" in one_line_failure(result)
    assert time.monotonic() - started < 15  # the Get fails fast; no minute of stream retries


def test_ctrl_c_in_watch_leaves_the_job_running_and_prints_how_to_resume(checked_cluster):
    spec = json_format.ParseDict(
        {"name": "long", "seed": 1, "width": 64, "height": 64,
         "stages": [{"name": "long", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": 1000}}]},
        jpb.JobSpec(),
    )  # fmt: skip
    address = checked_cluster.gateway.address
    with BatonClient(address) as client:
        job = client.submit(spec)
        try:
            watch = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "watch", job.id, "--gateway", address],
                cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=lambda: [lines.put(line) for line in watch.stderr], daemon=True).start()
            seen = []
            while not any("stage long running on" in line for line in seen):
                seen.append(lines.get(timeout=60))
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=30) == 130
            time.sleep(0.2)  # the reader thread drains the rest
            stderr = "".join(seen) + "".join(lines.queue)
            assert f"baton watch {job.id} --after " in stderr
            assert "Traceback" not in stderr
            assert client.get(job.id).state == jpb.JOB_STATE_RUNNING
        finally:
            client.cancel(job.id, "test over")
            wait_for_job(client, job.id)


def test_the_resume_command_repeats_the_flags_and_names_only_a_gateway_that_is_not_the_default(monkeypatch):
    from argparse import Namespace

    from services.cli.watch import resume_command

    monkeypatch.delenv("BATON_GATEWAY", raising=False)
    here = Namespace(gateway="127.0.0.1:50051", events=False, previews=None)
    assert resume_command(here, "j1", "17-0") == "baton watch j1 --after 17-0"
    there = Namespace(gateway="gpu-box:50051", events=True, previews=Path("my previews"))
    expected = "baton watch j1 --after 17-0 --events --previews 'my previews' --gateway gpu-box:50051"
    assert resume_command(there, "j1", "17-0") == expected


def test_a_preview_path_sorts_by_step_and_stays_in_its_folder(tmp_path):
    from services.cli.watch import preview_path

    assert preview_path(tmp_path, "base", 2) == tmp_path / "base" / "step-002.png"
    assert preview_path(tmp_path, "base", 1000).name == "step-1000.png"
    assert preview_path(tmp_path, "../up", 1).parent.parent == tmp_path
