"""JobStore: job records, their event streams, leases and the job index, in Redis.

Keys (a job's keys share the hash tag {id}, so they live on one Redis Cluster slot):
  <p>:job:{id}            the Job (serialized protobuf), expiring after the retention
  <p>:job:{id}:events     a Redis Stream of JobEvents: Watch resumes from an entry id
  <p>:job:{id}:lease      which gateway runs the job; it expires if that gateway dies
  <p>:job:{id}:cancel     set by Cancel on any replica; the running gateway polls it
  <p>:jobs                sorted set of job ids by creation time (List)
  <p>:jobs:active         job ids not yet finished (takeover after a gateway dies)
  <p>:idem:{key}          idempotency key -> job id
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import NotFound

TERMINAL = frozenset({jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED})
STREAM_MAXLEN = 100_000


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore:
    def __init__(self, client: Any, *, prefix: str = "baton", retention_s: float = 86400.0):
        self.redis = client
        self.prefix = prefix
        self.retention_s = retention_s

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{{{job_id}}}" + (f":{part}" if part else "")

    @property
    def _index(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def _active(self) -> str:
        return f"{self.prefix}:jobs:active"

    def _ttl_ms(self) -> int:
        return int(self.retention_s * 1000)

    # -- records ---------------------------------------------------------------------------
    async def create(self, spec: jpb.JobSpec, idempotency_key: str = "") -> tuple[jpb.Job, bool]:
        """A new queued job, or the job an earlier Submit with the same key made."""
        job_id = uuid.uuid4().hex
        if idempotency_key:
            idem = f"{self.prefix}:idem:{{{idempotency_key}}}"
            if not await self.redis.set(idem, job_id, nx=True, px=self._ttl_ms()):
                existing = _text(await self.redis.get(idem))
                return await self.get(existing), False
        created = now_ts()
        expires = Timestamp(seconds=created.seconds + int(self.retention_s))
        job = jpb.Job(
            id=job_id, spec=spec, state=jpb.JOB_STATE_QUEUED, idempotency_key=idempotency_key,
            created_at=created, expires_at=expires,
        )  # fmt: skip
        await self.save(job)
        await self.redis.zadd(self._index, {job_id: time.time()})
        await self.redis.sadd(self._active, job_id)
        await self.append(job_id, jpb.JobEvent(job_state=jpb.JOB_STATE_QUEUED))
        return job, True

    async def get(self, job_id: str) -> jpb.Job:
        raw = await self.redis.get(self._key(job_id)) if job_id else None
        if raw is None:
            raise NotFound(f"job {job_id!r} does not exist or has expired", field="job_id")
        return jpb.Job.FromString(raw)

    async def save(self, job: jpb.Job) -> None:
        await self.redis.set(self._key(job.id), job.SerializeToString(), px=self._ttl_ms())

    async def list_jobs(self, state: int, page_size: int, page_token: str) -> tuple[list[jpb.Job], str]:
        """Newest first; the token is an offset into the index."""
        size = min(max(page_size, 1), 1000) if page_size else 100
        offset = int(page_token or 0)
        jobs: list[jpb.Job] = []
        while len(jobs) < size:
            ids = await self.redis.zrevrange(self._index, offset, offset + size - 1)
            if not ids:
                return jobs, ""
            offset += len(ids)
            for job_id in ids:
                try:
                    job = await self.get(_text(job_id))
                except NotFound:
                    await self.redis.zrem(self._index, job_id)
                    continue
                if not state or job.state == state:
                    jobs.append(job)
        return jobs, str(offset)

    # -- events ----------------------------------------------------------------------------
    async def append(self, job_id: str, event: jpb.JobEvent) -> str:
        event.job_id = job_id
        event.time.CopyFrom(now_ts())
        stream = self._key(job_id, "events")
        entry = await self.redis.xadd(stream, {"e": event.SerializeToString()}, maxlen=STREAM_MAXLEN, approximate=True)
        await self.redis.pexpire(stream, self._ttl_ms())
        return _text(entry)

    async def events(self, job_id: str, after: str, block_ms: int = 1000) -> list[jpb.JobEvent]:
        """Events after entry id `after` ("0" for all), waiting up to block_ms for new ones."""
        reply = await self.redis.xread({self._key(job_id, "events"): after or "0"}, count=500, block=block_ms)
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                event = jpb.JobEvent.FromString(fields[b"e"] if b"e" in fields else fields["e"])
                event.id = _text(entry_id)
                out.append(event)
        return out

    # -- running, cancelling, taking over --------------------------------------------------
    async def acquire(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self.redis.set(self._key(job_id, "lease"), owner, nx=True, px=int(lease_s * 1000)))

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        key = self._key(job_id, "lease")
        if _text(await self.redis.get(key) or b"") != owner:
            return False
        await self.redis.pexpire(key, int(lease_s * 1000))
        return True

    async def release(self, job_id: str) -> None:
        await self.redis.srem(self._active, job_id)
        await self.redis.unlink(self._key(job_id, "lease"))

    async def drop_lease(self, job_id: str) -> None:
        """Lets another gateway take the job over now rather than when the lease lapses."""
        await self.redis.unlink(self._key(job_id, "lease"))

    async def active(self) -> list[str]:
        return [_text(i) for i in await self.redis.smembers(self._active)]

    async def request_cancel(self, job_id: str, reason: str) -> None:
        await self.redis.set(self._key(job_id, "cancel"), reason or "cancelled by the client", px=self._ttl_ms())

    async def cancel_reason(self, job_id: str) -> str | None:
        raw = await self.redis.get(self._key(job_id, "cancel"))
        return None if raw is None else _text(raw)
