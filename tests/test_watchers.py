"""Many clients watching at once: every Watch holds a Redis connection through its blocking read,
and the gateway's own work (leases, records) must still get connections."""

from __future__ import annotations

import asyncio

from google.protobuf import json_format

from services.client import AsyncBatonClient
from services.common.api.baton.v1 import jobs_pb2 as jpb

WATCHERS = 150  # past redis-py's default pool of 100 connections


def test_a_job_watched_by_150_clients_at_once_succeeds_and_each_sees_its_end(checked_cluster):
    spec = json_format.ParseDict(
        {
            "name": "watched",
            "seed": 1,
            "width": 256,
            "height": 256,
            "stages": [{"name": "a", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": 12}}],
        },
        jpb.JobSpec(),
    )

    async def watch_all() -> list[jpb.JobEvent]:
        async with AsyncBatonClient(checked_cluster.gateway.address) as client:
            job = await client.submit(spec)

            async def last_event() -> jpb.JobEvent:
                events = [event async for event in client.watch(job.id)]
                return events[-1]

            return await asyncio.wait_for(asyncio.gather(*(last_event() for _ in range(WATCHERS))), 300)

    ends = asyncio.run(watch_all())
    assert {(e.job_state, e.error) for e in ends} == {(jpb.JOB_STATE_SUCCEEDED, "")}
