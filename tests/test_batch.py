"""Batches: a spec run once per row of overrides, resumable from its manifest, with no row run twice;
`baton batch` and BatonClient.batch / AsyncBatonClient.batch."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from services.client import AsyncBatonClient, BatonClient
from services.client.batch import Batch, Manifest, RowJob, RowResult, row_key
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from tests.service_procs import REPO

TWO_MODELS = {
    "name": "coop",
    "seed": 7,
    "inputs": [{"name": "init", "path": "spec-folder.png"}],
    "stages": [
        {"name": "draft", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": 4, "denoising_end": 0.5}},
        {"name": "finish", "denoise": {"model": "sd1-b", "prompt": "a cat", "steps": 4, "latents": "draft",
                                       "denoising_start": 0.5}},
        {"name": "post", "process": {"latents": "finish", "processors": ["scale;factor=1.0"]}},
    ],
}  # fmt: skip
# One small window, a processor and a latents output: each job is well under a second on tiny models.
SMALL = {
    "name": "small",
    "seed": 1,
    "width": 64,
    "height": 64,
    "stages": [
        {"name": "draft", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": 2}},
        {"name": "post", "process": {"latents": "draft", "processors": ["scale;factor=1.0"]}},
    ],
    "outputs": [{"stage": "post", "format": "safetensors"}],
}
# float32 latents times 1e39 are inf: the processor fails the stage at run time, not at Submit.
OVERFLOW = {"stages.post.process.processors": ["scale;factor=1e39"]}
ROWS, FAILING = 30, 17


def spec_of(data: dict) -> jpb.JobSpec:
    return json_format.ParseDict(data, jpb.JobSpec())


def planned(tmp_path: Path, rows, spec: dict = TWO_MODELS, **options) -> list[RowResult | RowJob]:
    batch = Batch(spec_of(spec), rows, manifest=tmp_path / "manifest.jsonl", **options)
    items = list(batch.plan())
    batch.close()
    return items


def one_spec(tmp_path: Path, row: dict, spec: dict = TWO_MODELS, **options) -> jpb.JobSpec:
    [item] = planned(tmp_path, [row], spec, **options)
    assert isinstance(item, RowJob), item
    return item.spec


def refusal(tmp_path: Path, rows: list, spec: dict = TWO_MODELS, **options) -> str:
    """The error of the last row, which must be refused before anything is submitted."""
    item = planned(tmp_path, rows, spec, **options)[-1]
    assert isinstance(item, RowResult) and item.state == "failed", item
    return item.error


def stage(spec: jpb.JobSpec, name: str) -> jpb.StageSpec:
    return next(s for s in spec.stages if s.name == name)


# -- overrides --------------------------------------------------------------------------------
def test_a_stage_field_is_set_by_its_path_with_or_without_the_kind(tmp_path):
    spec = one_spec(tmp_path, {"stages.draft.denoise.steps": 9, "stages.finish.guidance_scale": 3.5})
    assert stage(spec, "draft").denoise.steps == 9
    assert stage(spec, "finish").denoise.guidance_scale == 3.5
    assert stage(spec, "finish").denoise.steps == 4


def test_a_repeated_stage_field_takes_a_list(tmp_path):
    spec = one_spec(tmp_path, {"stages.post.process.processors": ["scale;factor=2", "noise"]})
    assert list(stage(spec, "post").process.processors) == ["scale;factor=2", "noise"]


def test_a_bare_denoise_field_is_set_in_every_denoise_stage(tmp_path):
    spec = one_spec(tmp_path, {"prompt": "a dog", "steps": 6})
    assert [(s.denoise.prompt, s.denoise.steps) for s in spec.stages[:2]] == [("a dog", 6), ("a dog", 6)]


def test_a_bare_model_with_two_denoise_stages_is_refused_naming_the_stages_and_the_paths(tmp_path):
    error = refusal(tmp_path, [{"model": "sd1-b"}])
    assert error.startswith("row 1: model: ambiguous, the spec has 2 denoise stages (draft, finish)"), error
    assert "stages.draft.denoise.model or stages.finish.denoise.model" in error


def test_a_bare_model_with_one_denoise_stage_sets_it(tmp_path):
    assert stage(one_spec(tmp_path, {"model": "sd1-b"}, SMALL), "draft").denoise.model == "sd1-b"


def test_job_fields_and_labels_are_set_by_name(tmp_path):
    spec = one_spec(tmp_path, {"seed": 99, "width": 128, "name": "x", "labels.team": "art"})
    assert (spec.seed, spec.width, spec.name, spec.labels["team"]) == (99, 128, "x", "art")


def test_a_null_leaves_the_field_as_the_spec_has_it(tmp_path):
    spec = one_spec(tmp_path, {"steps": None, "stages.draft.denoise.prompt": None})
    assert stage(spec, "draft").denoise.steps == 4 and stage(spec, "draft").denoise.prompt == "a cat"


def test_seed_minus_one_leaves_the_seed_to_the_gateway(tmp_path):
    assert not one_spec(tmp_path, {"seed": -1}).HasField("seed")


def test_an_input_path_resolves_against_the_rows_folder_and_the_specs_own_stay_relative(tmp_path):
    rows = tmp_path / "rows" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_text('{"prompt": "a dog"}\n{"inputs.init": "cat.png"}\n')
    first, second = planned(tmp_path, rows)
    assert isinstance(first, RowJob) and isinstance(second, RowJob)
    assert first.spec.inputs[0].path == "spec-folder.png"  # the spec's base resolves it at upload
    assert second.spec.inputs[0].path == str(rows.parent / "cat.png")


def test_an_unknown_path_fails_its_row_with_the_row_number_and_a_suggestion(tmp_path):
    error = refusal(tmp_path, [{"prompt": "fine"}, {"stpes": 3}])
    assert error == 'row 2: stpes: unknown path; did you mean "steps"?'
    error = refusal(tmp_path, [{"stages.drafts.denoise.steps": 3}])
    assert "no stage 'drafts'" in error and "draft, finish, post" in error


def test_a_value_that_does_not_fit_fails_its_row_as_the_spec_parser_says_it(tmp_path):
    error = refusal(tmp_path, [{}] * 6 + [{"stages.draft.denoise.steps": "ten"}])
    assert error == "row 7: stages.draft.denoise.steps: expected an integer (int32), got the string 'ten'"


def test_a_failed_row_is_recorded_and_the_next_rows_go_on(tmp_path):
    items = planned(tmp_path, [{"steps": "x"}, {"steps": 3}])
    assert [type(i) for i in items] == [RowResult, RowJob]
    [entry] = Manifest(tmp_path / "manifest.jsonl").entries.values()
    assert (entry["row"], entry["state"]) == (1, "failed") and "expected an integer" in entry["error"]


def test_csv_cells_are_read_by_the_fields_type_and_an_empty_cell_is_no_override(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "prompt,steps,guidance_scale,stages.post.processors,seed\n"
        '123,3,7.5,"[scale;factor=2, noise]",\n'
        ",,,scale;factor=3,5\n"
    )
    first, second = planned(tmp_path, rows)
    assert isinstance(first, RowJob) and isinstance(second, RowJob)
    draft = stage(first.spec, "draft").denoise
    assert (draft.prompt, draft.steps, draft.guidance_scale, first.spec.seed) == ("123", 3, 7.5, 7)
    assert list(stage(first.spec, "post").process.processors) == ["scale;factor=2", "noise"]
    draft = stage(second.spec, "draft").denoise
    assert (draft.prompt, draft.steps, second.spec.seed) == ("a cat", 4, 5)
    assert list(stage(second.spec, "post").process.processors) == ["scale;factor=3"]


def test_set_applies_to_every_row_and_a_row_wins_over_it(tmp_path):
    items = planned(tmp_path, [{}, {"steps": 8}], every_row={"steps": "5", "prompt": "a fox"})
    assert [stage(i.spec, "draft").denoise.steps for i in items if isinstance(i, RowJob)] == [5, 8]
    assert all(stage(i.spec, "finish").denoise.prompt == "a fox" for i in items if isinstance(i, RowJob))


def test_a_set_value_that_does_not_fit_is_refused_before_any_row(tmp_path):
    with pytest.raises(InvalidArgument, match=r"^--set steps: expected an integer"):
        Batch(spec_of(TWO_MODELS), [], manifest=tmp_path / "m.jsonl", every_row={"steps": "x"}, every_row_label="--set")


def test_rows_are_read_lazily(tmp_path):
    endless = ({"seed": n} for n in itertools.count())
    batch = Batch(spec_of(TWO_MODELS), endless, manifest=tmp_path / "m.jsonl")
    first = list(itertools.islice(batch.plan(), 3))
    assert [i.spec.seed for i in first if isinstance(i, RowJob)] == [0, 1, 2]
    assert batch.total is None


# -- keys and the manifest --------------------------------------------------------------------
def test_the_same_row_of_the_same_batch_has_the_same_key_and_any_change_another():
    key = row_key("b1", 3, {"prompt": "a", "seed": 1})
    assert key == row_key("b1", 3, {"seed": 1, "prompt": "a"})
    assert key.startswith("batch-") and len(key) == len("batch-") + 32
    assert len({key, row_key("b1", 3, {"prompt": "b", "seed": 1}), row_key("b1", 4, {"prompt": "a", "seed": 1}),
                row_key("b2", 3, {"prompt": "a", "seed": 1})}) == 4  # fmt: skip


def test_the_batch_id_follows_the_spec_after_set(tmp_path):
    def batch_id(**options) -> str:
        return Batch(spec_of(TWO_MODELS), [], manifest=tmp_path / "m.jsonl", **options).id

    assert batch_id() == batch_id()
    assert batch_id(every_row={"steps": 5}) not in (batch_id(), batch_id(every_row={"steps": 6}))


def test_each_job_is_labelled_with_its_batch_and_row(tmp_path):
    batch = Batch(spec_of(TWO_MODELS), [{}, {}], manifest=tmp_path / "m.jsonl")
    jobs = [i for i in batch.plan() if isinstance(i, RowJob)]
    assert [dict(j.spec.labels) for j in jobs] == [{"baton.batch": batch.id, "baton.row": str(n)} for n in (1, 2)]
    assert jobs[0].key != jobs[1].key  # the same content on another row is another job


def test_a_run_again_skips_succeeded_rows_resumes_unfinished_ones_and_retries_failed_ones_when_asked(tmp_path):
    rows = [{"seed": n} for n in range(1, 5)]
    first = Batch(spec_of(TWO_MODELS), rows, manifest=tmp_path / "m.jsonl")
    jobs = [i for i in first.plan() if isinstance(i, RowJob)]
    first.submitted(jobs[0], "j1")
    first.ended(jobs[0], jpb.Job(id="j1", state=jpb.JOB_STATE_SUCCEEDED))
    first.submitted(jobs[1], "j2")
    first.submitted(jobs[2], "j3")
    first.ended(jobs[2], jpb.Job(id="j3", state=jpb.JOB_STATE_FAILED, error="boom"))
    first.close()

    def again(retry_failed: bool) -> list[tuple[int, str, str, int]]:
        batch = Batch(spec_of(TWO_MODELS), rows, manifest=tmp_path / "m.jsonl", retry_failed=retry_failed)
        items = list(batch.plan())
        batch.close()
        return [(i.row, i.key, getattr(i, "state", "run"), i.attempt) for i in items]

    assert again(False) == [
        (1, jobs[0].key, "succeeded", 1),
        (2, jobs[1].key, "run", 1),  # the same key: the gateway answers with the same job
        (3, jobs[2].key, "failed", 1),
        (4, jobs[3].key, "run", 1),
    ]
    assert again(True)[2] == (3, jobs[2].key + "-retry2", "run", 2)


def test_the_manifests_last_line_for_a_row_wins_and_closing_compacts_it_in_row_order(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"row": 2, "state": "submitted"}\n{"row": 1, "state": "failed"}\n{"row": 2, "state": "succeeded"}\n{"row": 3'
    )
    manifest = Manifest(path)
    manifest.write({"row": 3, "state": "submitted"})
    manifest.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["row"], e["state"]) for e in lines] == [(1, "failed"), (2, "succeeded"), (3, "submitted")]


def test_a_gateway_that_never_answers_stops_the_batch_at_once_and_fails_no_row(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{free.getsockname()[1]}"
    started = time.monotonic()
    with BatonClient(address) as client, pytest.raises(grpc.RpcError) as info:
        list(client.batch(spec_of(SMALL), [{"seed": 1}, {"seed": 2}], manifest=tmp_path / "m.jsonl"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10
    assert (tmp_path / "m.jsonl").read_text() == ""  # nothing ran: the same command resumes from scratch


# -- against a cluster ------------------------------------------------------------------------
def baton_batch(cluster, spec: Path, rows: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", "batch", str(spec), "--rows", str(rows), "--out", str(out),
            "--concurrency", "3", "--gateway", cluster.gateway.address, *flags]  # fmt: skip


def manifest_of(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_states(out: Path) -> dict[int, str]:
    found: dict[int, str] = {}
    for line in (out / "manifest.jsonl").read_text().splitlines() if (out / "manifest.jsonl").exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        found[entry["row"]] = entry["state"]
    return found


def jobs_by_row(client, batch_id: str) -> dict[int, list[str]]:
    rows: dict[int, list[str]] = {}
    for job in client.list():
        if job.spec.labels.get("baton.batch") == batch_id:
            rows.setdefault(int(job.spec.labels["baton.row"]), []).append(job.id)
    return rows


@pytest.fixture
def small_batch(tmp_path):
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(SMALL))
    rows = tmp_path / "rows.jsonl"
    lines = [{"prompt": f"a cat, number {n}", "seed": n, **(OVERFLOW if n == FAILING else {})} for n in range(1, 31)]
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return spec, rows, tmp_path / "out"


@pytest.mark.slow
def test_baton_batch_interrupted_and_run_again_runs_every_row_exactly_once(checked_cluster, small_batch):
    spec, rows, out = small_batch
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = baton_batch(checked_cluster, spec, rows, out)
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while sum(s != "submitted" for s in last_states(out).values()) < 10 and first.poll() is None:
            assert time.monotonic() < deadline, "10 rows did not end within 90 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert "run the same command again to resume" in stderr, stderr
    interrupted = manifest_of(out)
    assert [e["row"] for e in interrupted] == sorted({e["row"] for e in interrupted})  # compacted
    assert len(interrupted) < ROWS

    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr  # one row failed
    entries = manifest_of(out)
    assert [e["row"] for e in entries] == list(range(1, ROWS + 1))
    states = {e["row"]: e["state"] for e in entries}
    assert [r for r, s in states.items() if s != "succeeded"] == [FAILING]
    failed = entries[FAILING - 1]
    assert "NaN or inf" in failed["error"], failed
    assert f"row {FAILING}: " in done.stdout and "NaN or inf" in done.stdout, done.stdout
    assert "29 succeeded, 1 failed" in done.stdout, done.stdout
    assert (out / "00001" / "post.safetensors").is_file() and not (out / f"{FAILING:05d}").exists()

    with checked_cluster.client() as client:
        batch_id = client.get(entries[0]["job_id"]).spec.labels["baton.batch"]
        ran = jobs_by_row(client, batch_id)
        assert sorted(ran) == list(range(1, ROWS + 1)) and all(len(ids) == 1 for ids in ran.values()), ran
        assert {ids[0] for ids in ran.values()} == {e["job_id"] for e in entries}

        retried = subprocess.run([*argv, "--retry-failed"], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=90)  # fmt: skip
        assert retried.returncode == 1, retried.stderr
        assert f"{ROWS - 1} skipped" in retried.stdout, retried.stdout
        ran_again = jobs_by_row(client, batch_id)
        assert {r: len(ids) for r, ids in ran_again.items() if len(ids) != 1} == {FAILING: 2}
        assert sum(len(ids) for ids in ran_again.values()) == ROWS + 1
    entry = manifest_of(out)[FAILING - 1]
    assert (entry["attempt"], entry["key"]) == (2, failed["key"] + "-retry2")
    assert entry["job_id"] != failed["job_id"]


def test_the_sdk_batch_yields_one_result_per_row(checked_cluster, tmp_path):
    rows = [{"prompt": "a fox", "seed": 3}, {"steps": "many"}, {"steps": 100000}, {"prompt": "an owl"}]
    with checked_cluster.client() as client:
        results = list(client.batch(spec_of(SMALL), rows, out_dir=tmp_path, concurrency=2))
    by_row = {r.row: r for r in results}
    assert sorted(by_row) == [1, 2, 3, 4]
    assert [by_row[n].state for n in (1, 2, 3, 4)] == ["succeeded", "failed", "failed", "succeeded"]
    assert by_row[2].error.startswith("row 2: steps: expected an integer")
    assert by_row[3].error.startswith("INVALID_ARGUMENT: ") and by_row[3].job_id == ""  # refused at Submit
    assert by_row[1].outputs == [str(tmp_path / "00001" / "post.safetensors")]
    assert Path(by_row[1].outputs[0]).is_file()


def test_the_async_sdk_batch_yields_one_result_per_row_and_skips_them_when_run_again(checked_cluster, tmp_path):
    rows = [{"prompt": "a fox"}, {"prompt": "an owl"}, {"prompt": "a hen"}]

    async def run() -> list[RowResult]:
        async with AsyncBatonClient(checked_cluster.gateway.address) as client:
            return [r async for r in client.batch(spec_of(SMALL), rows, manifest=tmp_path / "m.jsonl")]

    first = asyncio.run(run())
    assert sorted((r.row, r.state, r.skipped) for r in first) == [(n, "succeeded", False) for n in (1, 2, 3)]
    again = asyncio.run(run())
    assert sorted((r.row, r.job_id, r.skipped) for r in again) == sorted((r.row, r.job_id, True) for r in first)
