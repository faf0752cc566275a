"""JobProgress: what `baton run` and `baton watch` show on stderr, fed with synthetic JobEvents
whose `time` is set as the gateway sets it, and fed all at once as a late watch replays them."""

from __future__ import annotations

import io

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.cli.progress import JobProgress
from services.common.api.baton.v1 import jobs_pb2 as jpb

T0 = 1_700_000_000.0
WORKER = "127.0.0.1:50061"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((T0 + seconds) * 1e9))
    return stamp


def event(seconds: float | None, **fields) -> jpb.JobEvent:
    stamp = {} if seconds is None else {"time": at(seconds)}
    return jpb.JobEvent(job_id="job1", id=f"{len(fields)}-0", **stamp, **fields)


def stage(seconds: float, state: int, name: str = "base", **fields) -> jpb.JobEvent:
    return event(seconds, stage=jpb.StageStatus(name=name, kind="denoise", state=state, **fields))


def a_20_step_stage_over_19_7_s() -> list[jpb.JobEvent]:
    steps = [event(i * 19.7 / 20, progress=jpb.StepProgress(stage="base", step=i, total=20)) for i in range(1, 21)]
    return [
        event(0.0, job_state=jpb.JOB_STATE_RUNNING),
        stage(0.0, jpb.STAGE_STATE_RUNNING, worker=WORKER, attempts=1),
        *steps,
        stage(19.7, jpb.STAGE_STATE_SUCCEEDED, worker=WORKER, attempts=1, step=20, total=20),
        event(19.8, job_state=jpb.JOB_STATE_SUCCEEDED),
    ]


def shown(events: list[jpb.JobEvent], file: io.StringIO | None = None) -> str:
    out = file or io.StringIO()
    JobProgress(file=out).feed(events)
    return out.getvalue()


def test_a_stage_fed_at_once_shows_the_elapsed_time_and_rate_of_its_event_times():
    text = shown(a_20_step_stage_over_19_7_s())
    # 19 steps between the first and the last step event, 18.715 s apart
    assert "stage base done in 19.7 s, 20 steps, 1.02 steps/s" in text
    assert "job job1 succeeded in 19.8 s" in text


def test_a_bar_shows_the_event_times_not_the_local_clock():
    progress = JobProgress(file=Terminal())
    for e in a_20_step_stage_over_19_7_s()[:-2]:
        progress.show(e)
    numbers = progress.bars["base"].format_dict
    assert numbers["elapsed"] == pytest.approx(19.7, abs=0.01)
    assert numbers["rate"] == pytest.approx(19 / (19.7 * 19 / 20), rel=1e-3)
    progress.close()


def test_a_watch_that_attaches_mid_stage_measures_from_the_first_step_it_sees():
    late = [
        event(10.0 + i, progress=jpb.StepProgress(stage="base", step=s, total=30)) for i, s in enumerate(range(11, 21))
    ]
    text = shown([*late, stage(20.0, jpb.STAGE_STATE_SUCCEEDED, step=30, total=30)])
    assert "stage base done in 10.0 s" in text
    assert "1.00 steps/s" in text


def test_a_queued_job_shows_its_place_in_the_queue():
    text = shown([event(0.0, job_state=jpb.JOB_STATE_QUEUED), event(None, queue=jpb.QueueStatus(position=3))])
    assert "job job1 queued at 3" in text


def test_a_stage_that_waits_says_why():
    text = shown([stage(0.0, jpb.STAGE_STATE_RUNNING, waiting="every denoiser is busy")])
    assert "stage base waiting: every denoiser is busy" in text


def test_a_retried_stage_shows_its_attempt_and_where_it_resumed():
    text = shown([stage(0.0, jpb.STAGE_STATE_RUNNING, worker=WORKER, attempts=2, resumed_from=12)])
    assert f"stage base running on {WORKER} (attempt 2, resumed at step 12)" in text


def test_a_failed_stage_and_job_say_why():
    text = shown(
        [
            stage(0.0, jpb.STAGE_STATE_RUNNING, worker=WORKER),
            stage(1.0, jpb.STAGE_STATE_FAILED, error="UNAVAILABLE: the denoiser went away"),
            event(1.1, job_state=jpb.JOB_STATE_FAILED, error="stage 'base' failed"),
        ]
    )
    assert "stage base FAILED: UNAVAILABLE: the denoiser went away" in text
    assert "job job1 failed" in text and "stage 'base' failed" in text


def test_a_running_stage_without_steps_is_preparing_on_a_terminal():
    progress = JobProgress(file=Terminal())
    progress.show(stage(0.0, jpb.STAGE_STATE_RUNNING, worker=WORKER))
    assert progress.bars["base"].note == f"preparing on {WORKER}"
    progress.close()


def test_without_a_terminal_there_are_plain_lines_and_no_carriage_returns():
    text = shown(a_20_step_stage_over_19_7_s())
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()  # running on, a line each quarter of the steps, done, the job's end
    assert len(lines) == 6, lines
    assert lines[1:4] == [f"stage base step {n}/20, 1.02 steps/s" for n in (5, 10, 15)]


def test_closing_twice_draws_the_bars_once():
    terminal = Terminal()
    progress = JobProgress(file=terminal)
    for e in a_20_step_stage_over_19_7_s()[:-2]:  # interrupted mid-job
        progress.show(e)
    before = len(terminal.getvalue())
    progress.close()
    drawn = terminal.getvalue()
    progress.close()
    assert terminal.getvalue() == drawn
    closing = drawn[before:]
    assert closing.count("job job1 running") == 1 and closing.count("base ") == 1


def test_feed_closes_the_bars_when_interrupted():
    def interrupted():
        yield from a_20_step_stage_over_19_7_s()[:5]
        raise KeyboardInterrupt

    progress = JobProgress(file=Terminal())
    with pytest.raises(KeyboardInterrupt):
        progress.feed(interrupted())
    assert progress.closed


def test_quiet_shows_nothing():
    out = Terminal()
    JobProgress(quiet=True, file=out).feed(a_20_step_stage_over_19_7_s())
    assert out.getvalue() == ""
