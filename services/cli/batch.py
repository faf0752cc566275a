"""`baton batch SPEC --rows FILE`: the spec run once per row of a JSONL or CSV file, each row
overriding fields by dotted path, at most --concurrency jobs at a time.

Paths: name, seed, width, height, timeout_s; labels.<key>; inputs.<input> (a file, relative to
the rows file); stages.<stage>.<kind>.<field> or stages.<stage>.<field>; a bare denoise field
(prompt, negative_prompt, steps, guidance_scale, scheduler, ...) sets it in every denoise stage.
CSV cells and --set values are read by the field's type; rows win over --set.

Resumable: each row's idempotency key comes from the spec (after --set), the row's number and
content, and the manifest (JSONL, the last line of a row wins) says what each row became; run the
same command again and it skips finished rows, follows unfinished ones, and runs failed ones
again only with --retry-failed. Ctrl-C stops submitting and leaves running jobs running.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from services.cli.gateway_arg import add_gateway, client_for

PLAIN_EVERY_S, PLAIN_EVERY_ROWS = 5.0, 100  # progress lines when stderr is not a terminal
SHOWN_FAILURES = 10


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="run a spec once per row of a JSONL or CSV file (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="job spec, YAML or JSON (baton.v1.JobSpec)")
    p.add_argument("--rows", type=Path, required=True, metavar="FILE", help="overrides, a job a row: .jsonl or .csv")
    p.add_argument("--set", dest="set_values", action="append", default=[], metavar="PATH=VALUE",
                   help="an override for every row (repeatable)")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="DIR", help="write each row's outputs to DIR/<row, 5 digits>/")
    p.add_argument("--manifest", type=Path, metavar="FILE", help="the batch's manifest (default: DIR/manifest.jsonl)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N", help="jobs in flight at most (default: 4)")
    p.add_argument("--retry-failed", action="store_true", help="run the rows that failed again, under new keys")
    p.add_argument("--cancel-on-interrupt", action="store_true", help="on Ctrl-C, cancel the jobs in flight")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.common.errors import InvalidArgument

    every_row = {}
    for item in args.set_values:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise InvalidArgument(f"--set {item!r}: expected PATH=VALUE, e.g. --set steps=20")
        every_row[path.strip()] = value
    if args.manifest is None and args.out is None:
        raise InvalidArgument("give --out DIR (the manifest is then DIR/manifest.jsonl) or --manifest FILE")
    with client_for(args) as client:
        batch_run = client.batch(
            args.spec,
            args.rows,
            concurrency=args.concurrency,
            out_dir=args.out,
            manifest=args.manifest,
            retry_failed=args.retry_failed,
            cancel_on_interrupt=args.cancel_on_interrupt,
            every_row=every_row,
            every_row_label="--set",
        )
        batch = batch_run.batch
        progress = Progress(batch.total)
        try:
            with batch_run:
                for result in batch_run:
                    progress.add(result, len(batch.running))
        except KeyboardInterrupt:
            progress.close()
            left = len(batch.running)
            jobs = f"{left} job{'s' if left != 1 else ''} keep{'s' if left == 1 else ''} running on the cluster"
            if args.cancel_on_interrupt:
                jobs = f"{batch.cancelled} job{'s' if batch.cancelled != 1 else ''} cancelled"
            print(
                f"baton batch: interrupted; {jobs}; the manifest is {batch.manifest.path}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return 130
        progress.close()
    print(progress.summary(batch.id, batch.manifest.path))
    return 1 if progress.failed else 0


class Progress:
    """One tqdm bar of rows on a terminal (stderr), else a plain line every few seconds or rows;
    the counts for the summary."""

    def __init__(self, total: int | None):
        self.total = total
        self.succeeded = self.failed = self.skipped = self.rows = 0
        self.failures: list[tuple[int, str]] = []
        self.started = self.said = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", desc="batch", file=sys.stderr, dynamic_ncols=True)

    def add(self, result, running: int) -> None:
        self.rows += 1
        self.skipped += result.skipped
        if result.state == "succeeded":
            self.succeeded += 1
        else:
            self.failed += 1
            self.failures = sorted([*self.failures, (result.row, result.error or result.state)])[:SHOWN_FAILURES]
        counts = {"done": self.succeeded, "failed": self.failed, "running": running, "skipped": self.skipped}
        if self.bar is not None:
            self.bar.set_postfix(counts, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.said >= PLAIN_EVERY_S or self.rows % PLAIN_EVERY_ROWS == 0:
            self.said = now
            rate = self.rows / max(now - self.started, 1e-9)
            of = f"/{self.total}" if self.total is not None else ""
            text = ", ".join(f"{v} {k}" for k, v in counts.items())
            print(f"batch: {self.rows}{of} rows ({text}), {rate:.1f} rows/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, batch_id: str, manifest: Path) -> str:
        lines = [
            f"batch {batch_id}: {self.rows} rows, {self.succeeded} succeeded, {self.failed} failed "
            f"({self.skipped} skipped: already in the manifest)",
            f"manifest: {manifest}",
        ]
        if self.failures:
            more = f" (the first {SHOWN_FAILURES}; all in the manifest)" if self.failed > SHOWN_FAILURES else ""
            lines.append(f"failed rows{more}:")
            lines += [f"  row {row}: {' '.join(error.split())}" for row, error in self.failures]
            lines.append("run again with --retry-failed to run them again")
        return "\n".join(lines)
