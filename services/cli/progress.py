"""Job progress on stderr, fed with JobEvents: a bar per stage on a terminal, plain lines
elsewhere (CI logs, a pipe), and the summary at the end.

Times are the gateway's, never this process's clock: each JobEvent's `time` is set when the
event is stored, so a `baton watch` that attaches late and replays a job's history in a burst
still shows how long each stage took and how fast it stepped.

tqdm draws the bars rather than rich: tqdm imports in ~20 ms against rich's 100+ ms, which counts
in a CLI that must start in well under a second, and its `format_dict` hook lets a bar show our
clock instead of its own. Bars are redrawn on events only (no monitor thread, no minimum
interval), and closed once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from services.common.api.baton.v1 import jobs_pb2 as jpb

TERMINAL = (jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED)
STEPPED = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{note}"
UNSTEPPED = "{desc} [{elapsed_s:.1f}s]{note}"


def job_state(state: int) -> str:
    return jpb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def event_time(event: jpb.JobEvent) -> float:
    """When the gateway stored the event (queue events are not stored: now)."""
    return event.time.ToNanoseconds() / 1e9 if event.HasField("time") else time.time()


class StageClock:
    """What the events have said of one stage, and its elapsed time and step rate by their times."""

    def __init__(self, name: str):
        self.name = name
        self.status = jpb.StageStatus(name=name)
        self.start: float | None = None  # its first RUNNING stage event, else its first step event
        self.latest: float | None = None
        self.first_step: tuple[int, float] | None = None
        self.last_step: tuple[int, float] | None = None

    def on_stage(self, status: jpb.StageStatus, t: float) -> None:
        self.status.CopyFrom(status)
        if status.state == jpb.STAGE_STATE_RUNNING and self.start is None:
            self.start = t
        self.latest = t

    def on_step(self, progress: jpb.StepProgress, t: float) -> None:
        s = self.status
        s.step, s.total, s.waiting = progress.step, progress.total, ""
        if self.start is None:
            self.start = t
        if self.first_step is None or progress.step < self.first_step[0]:  # a retry that starts over
            self.first_step = (progress.step, t)
        self.last_step = (progress.step, t)
        self.latest = t

    def quarter(self) -> int:
        """How many quarters of its steps the stage has done (0-4)."""
        s = self.status
        return 4 * s.step // s.total if s.total > 0 and self.stepped else 0

    def step_line(self) -> str:
        rate = self.rate()
        return f"step {self.status.step}/{self.status.total}" + (f", {rate:.2f} steps/s" if rate else "")

    @property
    def stepped(self) -> bool:
        return self.last_step is not None

    def elapsed(self) -> float:
        return self.latest - self.start if self.start is not None and self.latest is not None else 0.0

    def rate(self) -> float | None:
        """Steps per second between the first and the latest step event seen."""
        if self.first_step is None or self.last_step is None:
            return None
        steps, seconds = self.last_step[0] - self.first_step[0], self.last_step[1] - self.first_step[1]
        return steps / seconds if steps > 0 and seconds > 0 else None

    def note(self) -> str:
        """The stage's state in a few words: why it waits, where it runs, retries."""
        s = self.status
        if s.state == jpb.STAGE_STATE_SUCCEEDED:
            words = ["done"]
        elif s.state == jpb.STAGE_STATE_FAILED:
            return f"FAILED: {s.error}"
        elif s.state == jpb.STAGE_STATE_CANCELLED:
            return "cancelled"
        elif s.waiting:
            words = [s.waiting]
        elif s.state == jpb.STAGE_STATE_RUNNING:
            words = [("" if self.stepped else "preparing ") + (f"on {s.worker}" if s.worker else "")]
        else:
            words = ["pending"]
        return ", ".join(w.strip() for w in [*words, *self.retries()] if w.strip())

    def retries(self) -> list[str]:
        s = self.status
        return ([f"attempt {s.attempts}"] if s.attempts > 1 else []) + (
            [f"resumed at step {s.resumed_from}"] if s.resumed_from else []
        )


class StageBar(tqdm):
    """A tqdm bar that shows a StageClock's elapsed time and rate, and its note."""

    monitor_interval = 0  # no monitor thread: bars change on events only

    def __init__(self, clock: StageClock | None, file: TextIO, note: str = "", **kwargs):
        self.clock, self.note = clock, note
        super().__init__(file=file, **kwargs, **terminal_size(file))

    @property
    def format_dict(self):
        d = super().format_dict
        if self.clock is not None:
            # rate 0, not None: tqdm would otherwise guess n / elapsed
            d.update(elapsed=self.clock.elapsed(), rate=self.clock.rate() or 0)
        d["note"] = f"  {self.note}" if self.note else ""
        return d

    def redraw(self) -> None:
        """Draws the bar again, fitted to the terminal as it is now."""
        size = terminal_size(self.fp)
        self.ncols, self.nrows = size["ncols"], size["nrows"]
        self.refresh()


def terminal_size(file: TextIO) -> dict[str, int | None]:
    """tqdm's ncols and nrows for `file`; None where unknown. (tqdm's own dynamic_ncols reads a fresh
    pty's 0 x 0 as -1 x -1, and then draws nothing.)"""
    try:
        cols, rows = os.get_terminal_size(file.fileno())
    except (AttributeError, OSError, ValueError):
        cols = rows = 0
    return {"ncols": cols - 1 if cols > 1 else None, "nrows": rows if rows > 1 else None}


class JobProgress:
    """Shows a job's events on `file` (stderr): tqdm bars on a terminal, one line per stage
    transition elsewhere, nothing when quiet."""

    def __init__(self, quiet: bool = False, file: TextIO | None = None):
        self.quiet = quiet
        self.file = file if file is not None else sys.stderr
        self.lines = not quiet and not self.file.isatty()
        self.bars_on = not quiet and not self.lines
        self.clocks: dict[str, StageClock] = {}
        self.bars: dict[str, StageBar] = {}
        self.header: StageBar | None = None
        self.closed = False
        self.last_event_id = ""
        self.job_id = ""
        self.state: int = jpb.JOB_STATE_UNSPECIFIED
        self.position = 0
        self.started: float | None = None  # the job's RUNNING event
        self.ended: float | None = None
        self.error = ""

    def feed(self, events: Iterable[jpb.JobEvent]) -> jpb.JobEvent | None:
        """Consumes events until the job ends; returns the event that ended it. Closes the bars
        however it ends (Ctrl-C too)."""
        try:
            for event in events:
                self.show(event)
                if event.WhichOneof("event") == "job_state" and event.job_state in TERMINAL:
                    return event
            return None
        finally:
            self.close()

    def show(self, event: jpb.JobEvent) -> None:
        self.last_event_id, self.job_id = event.id or self.last_event_id, event.job_id or self.job_id
        kind, t = event.WhichOneof("event"), event_time(event)
        if kind == "queue":
            self._queued(event.queue.position)
        elif kind == "job_state":
            self._job(event.job_state, event.error, t)
        elif kind == "stage":
            self._running()
            clock = self._clock(event.stage.name)
            before = self._transition(clock)
            clock.on_stage(event.stage, t)
            self._stage_changed(clock, before)
        elif kind == "progress":
            self._running()
            clock = self._clock(event.progress.stage)
            quarter = clock.quarter()
            clock.on_step(event.progress, t)
            if self.lines and 0 < clock.quarter() < 4 and clock.quarter() != quarter:
                self._say(f"stage {clock.name} {clock.step_line()}")  # a long stage is not silent in a log
            self._draw(clock)

    # -- job -------------------------------------------------------------------------------
    def _queued(self, position: int) -> None:
        if position == self.position:
            return
        self.state, self.position = jpb.JOB_STATE_QUEUED, position
        self._say(f"job {self.job_id} queued at {position}")
        self._draw_header()

    def _running(self) -> None:
        """A stage's event says the job runs (a watch that started after its RUNNING event)."""
        if self.state in (jpb.JOB_STATE_UNSPECIFIED, jpb.JOB_STATE_QUEUED):
            self.state = jpb.JOB_STATE_RUNNING

    def _job(self, state: int, error: str, t: float) -> None:
        self.state, self.error = state, error
        if state == jpb.JOB_STATE_RUNNING and self.started is None:
            self.started = t
        if state in TERMINAL:
            self.ended = t
            self._say(self.job_line())
        self._draw_header()

    def job_line(self) -> str:
        text = f"job {self.job_id} {job_state(self.state)}"
        if self.state == jpb.JOB_STATE_QUEUED:
            return text + (f" at {self.position}" if self.position else "")
        if self.state in TERMINAL and self.started is not None and self.ended is not None:
            text += f" in {self.ended - self.started:.1f} s"
        return text + (f": {self.error}" if self.error else "")

    # -- stages ----------------------------------------------------------------------------
    def _clock(self, name: str) -> StageClock:
        if name not in self.clocks:
            self.clocks[name] = StageClock(name)
        return self.clocks[name]

    @staticmethod
    def _transition(clock: StageClock) -> tuple:
        s = clock.status
        return s.state, s.worker, s.attempts, s.waiting

    def _stage_changed(self, clock: StageClock, before: tuple) -> None:
        if self.lines and self._transition(clock) != before:
            line = self._stage_line(clock, before)
            if line:
                self._say(f"stage {clock.name} {line}")
        self._draw(clock)

    def _stage_line(self, clock: StageClock, before: tuple) -> str:
        s, retries = clock.status, ", ".join(clock.retries())
        if s.state == jpb.STAGE_STATE_SUCCEEDED:
            line = f"done in {clock.elapsed():.1f} s"
            rate = clock.rate()
            if clock.stepped:
                line += f", {s.step} steps" + (f", {rate:.2f} steps/s" if rate else "")
            return line + (f" ({retries})" if retries else "")
        if s.state == jpb.STAGE_STATE_FAILED:
            return f"FAILED: {s.error}"
        if s.state == jpb.STAGE_STATE_CANCELLED:
            return "cancelled"
        if s.state != jpb.STAGE_STATE_RUNNING:
            return ""
        if s.waiting:
            return f"waiting: {s.waiting}"
        if s.worker and (before[1], before[2]) != (s.worker, s.attempts):
            return f"running on {s.worker}" + (f" ({retries})" if retries else "")
        return "" if before[0] == s.state else "running"

    # -- drawing ---------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        if self.lines and not self.closed:
            print(line, file=self.file, flush=True)

    def _new_bar(self, clock: StageClock | None, position: int, desc: str, fmt: str, **kwargs) -> StageBar:
        return StageBar(
            clock,
            self.file,
            desc=desc,
            bar_format=fmt,
            position=position,
            unit="step",
            leave=True,
            mininterval=0,
            **kwargs,
        )

    def _draw_header(self) -> None:
        if not self.bars_on or self.closed:
            return
        if self.header is None:
            self.header = self._new_bar(None, 0, self.job_line(), "{desc}")
        else:
            self.header.set_description_str(self.job_line(), refresh=False)
            self.header.redraw()

    def _draw(self, clock: StageClock) -> None:
        if not self.bars_on or self.closed:
            return
        if self.header is None:
            self._draw_header()
        s, note = clock.status, clock.note()
        fmt, step = (STEPPED, min(s.step, s.total)) if s.total > 0 else (UNSTEPPED, 0)
        bar = self.bars.get(clock.name)
        if bar is None:  # drawn as it is made
            desc, position = f"{clock.name:<12}", len(self.bars) + 1
            kwargs = {"total": s.total or None, "initial": step, "note": note}
            self.bars[clock.name] = self._new_bar(clock, position, desc, fmt, **kwargs)
            return
        bar.bar_format, bar.total, bar.n, bar.note = fmt, s.total or None, step, note
        bar.redraw()

    def close(self) -> None:
        """Leaves each bar drawn in its final state, once (later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.header is not None:
            self.header.set_description_str(self.job_line(), refresh=False)
            self.header.close()
        for bar in self.bars.values():
            bar.close()


def summary(job: jpb.Job, written: list[Path]) -> str:
    lines = [f"job {job.id}: {job_state(job.state)}" + (f" ({job.error})" if job.error else "")]
    for s in job.stages:
        took = ""
        if s.HasField("started_at") and s.HasField("finished_at"):
            took = f"{s.finished_at.ToMilliseconds() / 1000 - s.started_at.ToMilliseconds() / 1000:6.2f}s"
        state = jpb.StageState.Name(s.state).removeprefix("STAGE_STATE_").lower()
        retry = f" attempts={s.attempts}" if s.attempts > 1 else ""
        lines.append(f"  {s.name:<14} {s.kind:<9} {state:<10} {took:>8}  {s.worker}{retry}")
        if s.error:
            lines.append(f"    {s.error}")
    lines += [f"  wrote {path}" for path in written]
    return "\n".join(lines)
