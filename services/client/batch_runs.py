"""The drivers of a Batch (services.client.batch): BatchRun runs it on a pool of `concurrency`
threads, each submitting a row and following its job to the end; AsyncBatchRun runs a task per row
in flight. Both wait out a busy or briefly absent gateway, stop the batch when it stays away, and
on an early stop leave jobs in flight running unless `cancel_on_interrupt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from services.client.batch import Batch, RowJob, RowResult, is_patient, open_batch
from services.client.sync_client import is_end
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.backoff import Backoff
from services.common.errors import BatonError

if TYPE_CHECKING:
    from services.client.async_client import AsyncBatonClient
    from services.client.sync_client import BatonClient

WATCH_SLICE_S = 2.0  # how soon a worker thread notices that the batch stops


def rpc_text(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _out(out_dir: Path | None, row: int) -> Path | None:
    return None if out_dir is None else Path(out_dir) / f"{row:05d}"


# -- the sync driver ----------------------------------------------------------------------------
class BatchRun:
    """A batch being run: iterate it for one RowResult per row as each ends (skipped rows at once);
    `batch` holds the manifest and the running rows. Closing it, or Ctrl-C, stops submitting and
    compacts the manifest; jobs in flight go on unless `cancel_on_interrupt`."""

    def __init__(self, batch: Batch, results: Generator[RowResult, None, None]):
        self.batch = batch
        self._results = results

    def __iter__(self) -> BatchRun:
        return self

    def __next__(self) -> RowResult:
        return next(self._results)

    def close(self) -> None:
        self._results.close()
        self.batch.close()  # also when it was never iterated

    def __enter__(self) -> BatchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_sync(
    client: BatonClient,
    spec: Any,
    rows: Any,
    *,
    concurrency: int,
    out_dir: Path | None,
    manifest: Path | None,
    cancel_on_interrupt: bool,
    **options: Any,
) -> BatchRun:
    """BatonClient.batch: the batch, run by a pool of `concurrency` threads."""
    batch = open_batch(spec, rows, out_dir=out_dir, manifest=manifest, concurrency=concurrency, **options)
    return BatchRun(batch, _sync_results(client, batch, concurrency, out_dir, cancel_on_interrupt))


def _sync_results(
    client: BatonClient, batch: Batch, concurrency: int, out_dir: Path | None, cancel_on_interrupt: bool
) -> Generator[RowResult, None, None]:
    """Each of `concurrency` threads submits a row and follows its job to the end."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="baton-batch")
    pending: set[Future[RowResult | None]] = set()
    complete = False

    def ended() -> Iterator[RowResult]:
        for future in wait(pending, return_when=FIRST_COMPLETED).done:
            pending.discard(future)
            if (result := future.result()) is not None:
                yield result

    try:
        for item in batch.plan():
            if isinstance(item, RowResult):
                yield item
                continue
            while len(pending) >= concurrency:
                yield from ended()
            pending.add(pool.submit(_run_row, client, batch, item, _out(out_dir, item.row), stop))
        while pending:
            yield from ended()
        complete = True
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if not complete and cancel_on_interrupt:
            for job in list(batch.running.values()):
                with contextlib.suppress(grpc.RpcError):
                    batch.ended(job, client.cancel(job.job_id, "the batch was interrupted"))
                    batch.cancelled += 1
        batch.close()


def _run_row(
    client: BatonClient, batch: Batch, job: RowJob, out_dir: Path | None, stop: threading.Event
) -> RowResult | None:
    """Submits a row and follows its job to the end; None when the batch stopped first."""
    try:
        record = _submit(client, batch, job, stop)
    except grpc.RpcError as exc:
        if is_patient(exc):
            raise  # the cluster is away: the batch stops, to be resumed
        return batch.ended(job, error=rpc_text(exc))
    except BatonError as exc:  # an input file that is missing or unreadable
        return batch.ended(job, error=f"row {job.row}: {exc}")
    if record is None:
        return None
    batch.submitted(job, record.id)
    try:
        final = _follow(client, record.id, stop)
        if final is None:
            return None
        ok = final.state == jpb.JOB_STATE_SUCCEEDED
        written = client.download_outputs(final, out_dir) if ok and out_dir is not None else []
    except grpc.RpcError as exc:
        if is_patient(exc):
            raise
        return batch.ended(job, error=rpc_text(exc))
    return batch.ended(job, final, written)


def _submit(client: BatonClient, batch: Batch, job: RowJob, stop: threading.Event) -> jpb.Job | None:
    """Submit, waiting out a busy or briefly absent gateway; None when the batch stopped meanwhile."""
    backoff, since = Backoff(0.5, 5.0), time.monotonic()
    while True:
        try:
            return batch.answered(client.submit(client.upload_inputs(job.spec, batch.base), job.key))
        except grpc.RpcError as exc:
            if not batch.waits_out(exc, since):
                raise
        if stop.wait(backoff.next()):
            return None


def _follow(client: BatonClient, job_id: str, stop: threading.Event) -> jpb.Job | None:
    """The job's final record, watched in slices so that a stopped batch lets go within one."""
    cursor = ""
    while not stop.is_set():
        try:
            for event in client.watch(job_id, cursor, timeout=WATCH_SLICE_S):
                cursor = event.id or cursor
                if is_end(event):
                    break
            return client.get(job_id)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    return None


# -- the async driver ---------------------------------------------------------------------------
class AsyncBatchRun:
    """BatchRun for asyncio: `async for result in client.batch(...)`."""

    def __init__(self, batch: Batch, results: AsyncGenerator[RowResult, None]):
        self.batch = batch
        self._results = results

    def __aiter__(self) -> AsyncBatchRun:
        return self

    async def __anext__(self) -> RowResult:
        return await anext(self._results)

    async def aclose(self) -> None:
        await self._results.aclose()
        self.batch.close()

    async def __aenter__(self) -> AsyncBatchRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def run_async(
    client: AsyncBatonClient,
    spec: Any,
    rows: Any,
    *,
    concurrency: int,
    out_dir: Path | None,
    manifest: Path | None,
    cancel_on_interrupt: bool,
    **options: Any,
) -> AsyncBatchRun:
    """AsyncBatonClient.batch: the batch, run by a task per row in flight."""
    batch = open_batch(spec, rows, out_dir=out_dir, manifest=manifest, concurrency=concurrency, **options)
    return AsyncBatchRun(batch, _async_results(client, batch, concurrency, out_dir, cancel_on_interrupt))


async def _async_results(
    client: AsyncBatonClient, batch: Batch, concurrency: int, out_dir: Path | None, cancel_on_interrupt: bool
) -> AsyncGenerator[RowResult, None]:
    """A task per row in flight, at most `concurrency` of them."""
    pending: set[asyncio.Task[RowResult]] = set()
    complete = False
    try:
        for item in batch.plan():
            if isinstance(item, RowResult):
                yield item
                continue
            while len(pending) >= concurrency:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
            pending.add(asyncio.create_task(_run_row_async(client, batch, item, _out(out_dir, item.row))))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()
        complete = True
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if not complete and cancel_on_interrupt:
            for job in list(batch.running.values()):
                with contextlib.suppress(grpc.RpcError):
                    batch.ended(job, await client.cancel(job.job_id, "the batch was interrupted"))
                    batch.cancelled += 1
        batch.close()


async def _run_row_async(client: AsyncBatonClient, batch: Batch, job: RowJob, out_dir: Path | None) -> RowResult:
    """_run_row for asyncio: a cancelled task leaves its job running."""
    try:
        record = await _submit_async(client, batch, job)
    except grpc.RpcError as exc:
        if is_patient(exc):
            raise
        return batch.ended(job, error=rpc_text(exc))
    except BatonError as exc:
        return batch.ended(job, error=f"row {job.row}: {exc}")
    batch.submitted(job, record.id)
    try:
        final = await client.wait(record.id)
        ok = final.state == jpb.JOB_STATE_SUCCEEDED
        written = await client.download_outputs(final, out_dir) if ok and out_dir is not None else []
    except grpc.RpcError as exc:
        if is_patient(exc):
            raise
        return batch.ended(job, error=rpc_text(exc))
    return batch.ended(job, final, written)


async def _submit_async(client: AsyncBatonClient, batch: Batch, job: RowJob) -> jpb.Job:
    backoff, since = Backoff(0.5, 5.0), time.monotonic()
    while True:
        try:
            return batch.answered(await client.submit(await client.upload_inputs(job.spec, batch.base), job.key))
        except grpc.RpcError as exc:
            if not batch.waits_out(exc, since):
                raise
        await asyncio.sleep(backoff.next())
