"""`baton watch JOB [--after EVENT_ID]`: follow a job's progress until it ends.

Ctrl-C stops the watching, not the job: it prints the command that follows the job on from
where this watch stopped. Exits 0 when the job succeeded, 1 when it failed or was cancelled.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from services.cli.gateway_arg import add_gateway, client_for

PREVIEWS_HELP = (
    "write each step preview as it arrives to DIR/<stage>/step-<n>.png (denoise stages with preview_every); "
    "previews are kept in the job's event stream for its retention (best effort), so watching a job "
    "after the fact writes them too"
)


def register(subparsers) -> None:
    p = subparsers.add_parser("watch", help="follow a job until it ends", description=__doc__)
    p.add_argument("job_id")
    p.add_argument("--after", default="", metavar="EVENT_ID", help="resume after this event id")
    p.add_argument(
        "--events",
        action="store_true",
        help="print every event as a JSON line instead of progress; a preview is given as preview_bytes "
        "(its size) and, with --previews, preview_path",
    )
    p.add_argument("--previews", type=Path, metavar="DIR", help=PREVIEWS_HELP)
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.cli import outcome
    from services.cli.progress import JobProgress, summary
    from services.common.api.baton.v1 import jobs_pb2 as jpb

    with client_for(args) as client:
        # Fails fast (NOT_FOUND, UNAVAILABLE), where the stream would retry for a minute.
        job = client.get(args.job_id)
        stream = EventStream(client.watch(job.id, args.after), args.after, args.previews)
        progress = JobProgress(quiet=args.events)
        try:
            if args.events:
                for event in stream:
                    print(event_json(event, stream.preview), flush=True)
            else:
                progress.feed(stream)
        except KeyboardInterrupt:
            progress.close()
            again = resume_command(args, job.id, stream.last_id)
            print(f"baton watch: interrupted; job {job.id} goes on running; follow it with: {again}", file=sys.stderr)
            return outcome.INTERRUPTED
        job = client.get(job.id)
    if not args.events:
        print(summary(job, []) + stream.previews_line())
    return outcome.OK if job.state == jpb.JOB_STATE_SUCCEEDED else outcome.JOB_FAILED


class EventStream:
    """A job's events as they come, remembering the last one's id (to resume after) and writing
    each preview PNG under `previews` (`preview`: the path of the latest event's, if any)."""

    def __init__(self, events: Iterable, after: str = "", previews: Path | None = None):
        self.events = events
        self.last_id = after
        self.previews = previews
        self.preview: Path | None = None
        self.written: list[Path] = []

    def __iter__(self) -> Iterator:
        for event in self.events:
            self.last_id = event.id or self.last_id
            self.preview = None
            if self.previews is not None and event.WhichOneof("event") == "progress" and event.progress.preview_png:
                self.preview = write_preview(self.previews, event.progress)
                self.written.append(self.preview)
            yield event

    def previews_line(self) -> str:
        return f"\n  wrote {len(self.written)} previews under {self.previews}" if self.written else ""


def preview_path(folder: Path, stage: str, step: int) -> Path:
    """DIR/<stage>/step-<n>.png, n zero-padded to sort; a stage name never leaves DIR."""
    name = re.sub(r"[^\w.-]", "_", stage).lstrip(".") or "_"
    return folder / name / f"step-{step:03d}.png"


def write_preview(folder: Path, progress) -> Path:
    path = preview_path(folder, progress.stage, progress.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(progress.preview_png)
    return path


def event_json(event, preview: Path | None = None) -> str:
    """One event as a JSON line; a preview as its size (and path), never as base64."""
    import json

    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(event, preserving_proto_field_name=True)
    step = data.get("progress", {})
    if step.pop("preview_png", None) is not None:
        step["preview_bytes"] = len(event.progress.preview_png)
        if preview is not None:
            step["preview_path"] = str(preview)
    return json.dumps(data)


def resume_command(args: argparse.Namespace, job_id: str, after: str) -> str:
    """The `baton watch` that follows the job on, as this one did, after event `after`."""
    from services.common.credentials import gateway_address

    words = ["baton", "watch", job_id, *(["--after", after] if after else [])]
    words += ["--events"] if args.events else []
    words += ["--previews", str(args.previews)] if args.previews is not None else []
    if args.gateway != gateway_address():  # the default needs no flag
        words += ["--gateway", args.gateway]
    return shlex.join(words)
