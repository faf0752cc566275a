"""Job progress on a terminal: a bar per stage with step counts, and a summary at the end."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from services.common.api.baton.v1 import jobs_pb2 as jpb

STATE = {
    jpb.STAGE_STATE_RUNNING: "running",
    jpb.STAGE_STATE_SUCCEEDED: "done",
    jpb.STAGE_STATE_FAILED: "FAILED",
    jpb.STAGE_STATE_CANCELLED: "cancelled",
}


def job_state(state: int) -> str:
    return jpb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


class JobProgress:
    """Feeds on JobEvents; draws one tqdm bar per stage (on stderr) unless quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars: dict[str, tqdm] = {}
        self.last_event_id = ""
        self.job_id = ""

    def _bar(self, stage: str) -> tqdm:
        if stage not in self.bars:
            self.bars[stage] = tqdm(
                desc=f"{stage:<12}",
                total=1,
                unit="step",
                position=len(self.bars),
                leave=True,
                disable=self.quiet,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        return self.bars[stage]

    def feed(self, events: Iterable[jpb.JobEvent]) -> jpb.JobEvent | None:
        """Consumes events until the job ends; returns the event that ended it."""
        for event in events:
            self.last_event_id, self.job_id = event.id, event.job_id
            kind = event.WhichOneof("event")
            if kind == "progress":
                bar = self._bar(event.progress.stage)
                bar.total = event.progress.total
                bar.n = event.progress.step
                bar.refresh()
            elif kind == "stage":
                bar = self._bar(event.stage.name)
                bar.set_postfix_str(STATE.get(event.stage.state, ""), refresh=True)
                if event.stage.state == jpb.STAGE_STATE_SUCCEEDED and bar.total == 1:
                    bar.n = 1
                    bar.refresh()
            elif kind == "job_state" and event.job_state in (
                jpb.JOB_STATE_SUCCEEDED,
                jpb.JOB_STATE_FAILED,
                jpb.JOB_STATE_CANCELLED,
            ):
                self.close()
                return event
        self.close()
        return None

    def close(self) -> None:
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
