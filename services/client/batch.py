"""Batches: one job spec run once per row of a JSONL or CSV file (services.client.batch_rows), each
row overriding fields of the spec by dotted path (services.client.spec_overrides); at most
`concurrency` jobs in flight (services.client.batch_runs), resumable from a manifest. This module is
the part that never calls the gateway: the rows' keys, the manifest, and the Batch that plans which
rows to run, with what spec, and records what became of them.

Each row's idempotency key is `batch-<sha256[:32]>` of the batch id (the spec after `every_row`),
the row's number and its content, so running a batch again returns the jobs it already made; a
retry of a failed row (`retry_failed`) is `<key>-retry<attempt>`. Jobs carry the labels
`baton.batch` (the batch id) and `baton.row`. The manifest is JSONL, one line per row event, the
last line of a row wins; it is rewritten compacted (one line per row, in row order) at the end.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import json_format

from services.client.batch_rows import BadRow, count_rows, read_rows
from services.client.spec_overrides import apply_override
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from services.common.job_files import load_spec

STATES = {jpb.JOB_STATE_SUCCEEDED: "succeeded", jpb.JOB_STATE_FAILED: "failed", jpb.JOB_STATE_CANCELLED: "cancelled"}
ENDED_BADLY = ("failed", "cancelled")
# Not the row's fault: waited out (Submit with the same key is safe to repeat), then the batch stops.
PATIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
PATIENCE_S = 60.0  # as a watch waits for a gateway that went away (services.client.resume)


@dataclass
class RowResult:
    """What became of one row: state is submitted, succeeded, failed or cancelled; `skipped` when
    the manifest already had it (this run did nothing for it)."""

    row: int
    key: str
    job_id: str = ""
    state: str = ""
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    attempt: int = 1
    skipped: bool = False

    def entry(self) -> dict[str, Any]:
        """The row's manifest line."""
        return {
            "row": self.row,
            "key": self.key,
            "job_id": self.job_id,
            "state": self.state,
            "attempt": self.attempt,
            "outputs": self.outputs,
            "error": self.error,
        }


@dataclass
class RowJob:
    """A row to submit: its key and attempt, the spec with the row's overrides applied, and once
    submitted its job's id."""

    row: int
    key: str
    attempt: int
    spec: jpb.JobSpec
    job_id: str = ""

    def result(self, **fields: Any) -> RowResult:
        return RowResult(self.row, self.key, attempt=self.attempt, **fields)


# -- keys ---------------------------------------------------------------------------------------
def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def batch_id(template: Mapping[str, Any]) -> str:
    """The batch's id: sha256 (hex, 16) of the spec's JSON mapping after the every-row overrides."""
    return hashlib.sha256(_canonical(template)).hexdigest()[:16]


def row_key(batch: str, row: int, content: Mapping[str, Any] | BadRow) -> str:
    """The idempotency key of a row's first attempt: `batch-<sha256[:32]>` of batch, number, content."""
    body = content.text if isinstance(content, BadRow) else _canonical(content).decode()
    return "batch-" + hashlib.sha256(f"{batch}\n{row}\n{body}".encode()).hexdigest()[:32]


def attempt_key(key: str, attempt: int) -> str:
    """The key of a row's attempt: a retry of a failed row is a new request to the gateway."""
    return key if attempt <= 1 else f"{key}-retry{attempt}"


def _of_row(found: str, key: str) -> bool:
    return found == key or found.startswith(f"{key}-retry")


# -- the manifest -------------------------------------------------------------------------------
class Manifest:
    """The batch's JSONL record: one line per row event, the last line of a row wins; close()
    rewrites it one line per row, in row order (a temporary file, then os.replace)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[int, dict[str, Any]] = {}
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError, ValueError):
                entry = json.loads(line)  # a line cut short by a crash is skipped
                self.entries[int(entry["row"])] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._file.write("\n")  # so that the cut line does not swallow the next one

    def write(self, entry: dict[str, Any]) -> None:
        self.entries[entry["row"]] = entry
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Rewrites the manifest compacted."""
        self._file.close()
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as f:
            for row in sorted(self.entries):
                f.write(json.dumps(self.entries[row], ensure_ascii=False) + "\n")
        os.replace(temporary, self.path)


# -- the batch ----------------------------------------------------------------------------------
class Batch:
    """A spec (a JobSpec, or a spec file whose folder is then `base`) and its rows (a .jsonl/.csv
    file, whose folder is `rows_base`, or mappings): which rows to run (plan), with what key and
    spec, and the manifest. `every_row` overrides apply to the spec itself (errors start with
    `every_row_label`). `running` holds each row submitted and not yet ended, by row number."""

    def __init__(
        self,
        spec: jpb.JobSpec | str | Path,
        rows: str | Path | Iterable[Mapping[str, Any]],
        *,
        manifest: str | Path,
        every_row: Mapping[str, Any] | None = None,
        every_row_label: str = "every_row",
        base: str | Path | None = None,
        rows_base: str | Path | None = None,
        retry_failed: bool = False,
    ):
        if not isinstance(spec, jpb.JobSpec):
            base = Path(spec).parent if base is None else base
            spec = load_spec(spec)
        self.base = Path.cwd() if base is None else Path(base)
        self.template = json_format.MessageToDict(spec, preserving_proto_field_name=True)
        for path, value in (every_row or {}).items():
            try:
                apply_override(self.template, path, value, Path.cwd())
            except InvalidArgument as e:
                raise InvalidArgument(f"{every_row_label} {e.detail}") from None
        self.id = batch_id(self.template)
        self.retry_failed = retry_failed
        self.rows: Iterator[tuple[int, Mapping[str, Any] | BadRow]]
        self.total: int | None
        if isinstance(rows, str | Path):
            self.rows, self.total = read_rows(Path(rows)), count_rows(Path(rows))
            self.rows_base = Path(rows).parent if rows_base is None else Path(rows_base)
        else:
            self.rows = ((n, _mapping(row)) for n, row in enumerate(rows, 1))
            self.total = len(rows) if isinstance(rows, Sized) else None
            self.rows_base = Path.cwd() if rows_base is None else Path(rows_base)
        self.manifest = Manifest(Path(manifest))
        self.running: dict[int, RowJob] = {}
        self.cancelled = 0  # jobs cancelled when the run stopped early (cancel_on_interrupt)
        self.reached = False  # whether the gateway has answered this batch
        self.closed = False
        self._lock = threading.Lock()  # the manifest and `running`, written from worker threads

    def plan(self) -> Iterator[RowResult | RowJob]:
        """Per row, lazily: a RowResult for a row that is done (skipped, or refused here), else a RowJob."""
        for n, content in self.rows:
            key = row_key(self.id, n, content)
            earlier = self.manifest.entries.get(n)
            if earlier is not None and not _of_row(str(earlier.get("key", "")), key):
                earlier = None  # another batch's, or the row changed: a new row
            attempt = 1
            if earlier is not None:
                attempt, state = int(earlier.get("attempt", 1)), earlier.get("state", "")
                if state == "succeeded" or (state in ENDED_BADLY and not self.retry_failed):
                    yield self.skipped(earlier)
                    continue
                if state in ENDED_BADLY:
                    attempt += 1  # a new key, so that the gateway runs it again
            job = RowJob(n, attempt_key(key, attempt), attempt, jpb.JobSpec())
            try:
                job.spec = self.spec_for(n, content)
            except InvalidArgument as e:
                yield self.ended(job, error=str(e))
                continue
            yield job

    def spec_for(self, n: int, content: Mapping[str, Any] | BadRow) -> jpb.JobSpec:
        """The spec with row `n`'s overrides and the batch's labels."""
        if isinstance(content, BadRow):
            raise InvalidArgument(f"row {n}: {content.why}")
        data = copy.deepcopy(self.template)
        for path, value in content.items():
            try:
                apply_override(data, str(path), value, self.rows_base)
            except InvalidArgument as e:
                raise InvalidArgument(f"row {n}: {e.detail}") from None
        data.setdefault("labels", {}).update({"baton.batch": self.id, "baton.row": str(n)})
        try:
            return json_format.ParseDict(data, jpb.JobSpec())
        except json_format.ParseError as e:
            raise InvalidArgument(f"row {n}: {e}") from None

    @staticmethod
    def skipped(entry: Mapping[str, Any]) -> RowResult:
        fields = {k: entry[k] for k in ("row", "key", "job_id", "state", "outputs", "error", "attempt") if k in entry}
        return RowResult(**fields, skipped=True)

    def answered(self, record: jpb.Job) -> jpb.Job:
        self.reached = True
        return record

    def waits_out(self, exc: grpc.RpcError, since: float) -> bool:
        """Whether a Submit that failed with `exc` is tried again: a busy or briefly absent gateway
        is waited out for PATIENCE_S, but one that never answered this batch (a wrong address,
        no cluster) is not waited for."""
        code = exc.code()  # type: ignore[attr-defined]
        self.reached = self.reached or code != grpc.StatusCode.UNAVAILABLE
        return is_patient(exc) and self.reached and time.monotonic() - since <= PATIENCE_S

    def submitted(self, job: RowJob, job_id: str) -> None:
        job.job_id = job_id
        with self._lock:
            self.running[job.row] = job
            self.manifest.write(job.result(job_id=job_id, state="submitted").entry())

    def ended(
        self, job: RowJob, record: jpb.Job | None = None, outputs: Iterable[Path] = (), error: str = ""
    ) -> RowResult:
        """The row's result, recorded: its job's end, or `error` (a row refused, a job lost)."""
        result = job.result(
            job_id=record.id if record is not None else job.job_id,
            state=STATES.get(record.state, "failed") if record is not None else "failed",
            outputs=[str(p) for p in outputs],
            error=error or (record.error if record is not None else ""),
        )
        with self._lock:
            self.running.pop(job.row, None)
            self.manifest.write(result.entry())
        return result

    def close(self) -> None:
        """Compacts the manifest (rows still running keep their `submitted` line)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.manifest.close()


def _mapping(row: Any) -> Mapping[str, Any] | BadRow:
    return row if isinstance(row, Mapping) else BadRow(repr(row), "a row is a mapping of overrides")


def is_patient(exc: BaseException) -> bool:
    """Whether `exc` is not the row's fault: an RPC error that is waited out, then stops the batch."""
    return isinstance(exc, grpc.RpcError) and exc.code() in PATIENT_CODES


def open_batch(
    spec: Any, rows: Any, *, out_dir: str | Path | None, manifest: str | Path | None, concurrency: int, **options: Any
) -> Batch:
    """The Batch behind BatonClient.batch and AsyncBatonClient.batch, once their arguments are checked."""
    if concurrency < 1:
        raise InvalidArgument(f"concurrency must be at least 1, got {concurrency}")
    if manifest is None and out_dir is None:
        raise InvalidArgument("a batch needs a manifest file (or an out dir, whose manifest.jsonl it then is)")
    return Batch(spec, rows, manifest=manifest or Path(cast(Path, out_dir)) / "manifest.jsonl", **options)
