"""JobStore on a real Redis and a real Redis Cluster: records, the shared queue, leases, events."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.redis_conn import connect_async
from services.gateway.jobs import ALREADY_ENDED, LEASE_GONE, LEASE_TAKEN, RECORD_LOST, RENEWED, SAVED, JobStore


@pytest.fixture(params=["single", "cluster"])
def url(request):
    return request.getfixturevalue("redis_url" if request.param == "single" else "redis_cluster_url")


def with_store(url: str, body, retention_s: float = 600):
    async def go():
        client = connect_async(url, "auto")
        try:
            return await body(JobStore(client, prefix=f"t{uuid.uuid4().hex[:8]}", retention_s=retention_s))
        finally:
            await client.aclose()

    return asyncio.run(go())


async def new(store: JobStore, name: str = "j") -> jpb.Job:
    job, created = await store.create(store.new_job(jpb.JobSpec(name=name)), "", time.time() + 60)
    assert created
    return job


def test_a_terminal_record_is_never_rewritten(url):
    async def body(store: JobStore):
        job = await new(store)
        job.state = jpb.JOB_STATE_CANCELLED
        assert await store.save(job) == SAVED
        job.state, job.error = jpb.JOB_STATE_SUCCEEDED, "late"
        assert await store.save(job) == ALREADY_ENDED
        return await store.get(job.id)

    kept = with_store(url, body)
    assert kept.state == jpb.JOB_STATE_CANCELLED and kept.error == ""


def test_a_record_that_vanished_is_reported_lost_not_recreated(url):
    async def body(store: JobStore):
        job = await new(store)
        await store.redis.delete(store._key(job.id))
        return await store.save(job), await store.exists(job.id)

    assert with_store(url, body) == (RECORD_LOST, False)


def test_the_queue_is_shared_in_submission_order_with_places(url):
    async def body(store: JobStore):
        jobs = [await new(store, str(i)) for i in range(3)]
        head = [job_id for job_id, _ in await store.queue_head(10)]
        places = [await store.position(j.id) for j in jobs]
        await store.dequeue(jobs[0].id)
        return [j.id for j in jobs], head, places, await store.position(jobs[1].id)

    ids, head, places, after = with_store(url, body)
    assert head == ids and places == [1, 2, 3] and after == 1


def test_a_lease_is_renewed_only_by_its_owner(url):
    async def body(store: JobStore):
        job = await new(store)
        assert await store.acquire(job.id, "a", 5) and not await store.acquire(job.id, "b", 5)
        outcomes = [await store.renew(job.id, "a", 5), await store.renew(job.id, "b", 5)]
        await store.drop_lease(job.id, "b")  # not b's: stays
        outcomes.append(await store.renew(job.id, "a", 5))
        await store.drop_lease(job.id, "a")
        outcomes.append(await store.renew(job.id, "a", 5))
        return outcomes

    assert with_store(url, body) == [RENEWED, LEASE_TAKEN, RENEWED, LEASE_GONE]


def test_reading_after_the_last_event_answers_at_once(url):
    async def body(store: JobStore):
        job = await new(store)
        last = (await store.events(job.id, "0", block_ms=0))[-1].id
        start = time.monotonic()
        more = await store.events(job.id, last, block_ms=0)
        return more, time.monotonic() - start

    more, took = with_store(url, body)
    assert more == [] and took < 0.5


def test_the_index_keeps_only_jobs_within_the_retention(url):
    async def body(store: JobStore):
        old = await new(store, "old")
        await store.redis.zadd(store._index(), {old.id: time.time() - 10})  # as if made 10 s ago
        fresh = await new(store, "fresh")
        return [m.decode() for m in await store.redis.zrange(store._index(), 0, -1)], fresh.id

    members, fresh = with_store(url, body, retention_s=5)
    assert members == [fresh]
