"""JobStore: job records, their event streams, the shared queue, leases and the job index, in Redis.

Keys (a job's keys share the hash tag {id}, so they live on one Redis Cluster slot; every
script below touches one job's keys only):
  <p>:job:{id}            hash: `pb` the Job (serialized protobuf), `state` its JobState;
                          expires after the retention. Once a job is terminal its record is
                          never rewritten, so a Cancel and a late finish cannot undo each other.
  <p>:job:{id}:events     a Redis Stream of JobEvents: Watch resumes from an entry id
  <p>:job:{id}:lease      which gateway runs the job; it expires if that gateway stops renewing
  <p>:job:{id}:cancel     set by Cancel on any replica, kept for the retention; honoured by
                          whichever gateway runs the job, at takeover and before each stage
  <p>:jobs                sorted set of job ids by creation time (List), trimmed to the retention
  <p>:jobs:active         job ids not yet finished (for takeover and expiry)
  <p>:queue               sorted set of jobs waiting for a gateway, by submission time: every
                          replica takes from it, oldest first
  <p>:queue:deadlines     the same jobs by deadline, so an expired queued job is found cheaply
  <p>:idem:{tenant/key}   idempotency key -> "<job id> <spec fingerprint>" (just the job id when
                          written before fingerprints: it matches any spec)
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import MAX_NAME_BYTES, FailedPrecondition, NotFound, elide

TERMINAL = frozenset({jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED})
STREAM_MAXLEN = 100_000

# Save outcomes.
SAVED, ALREADY_ENDED, RECORD_LOST = 1, 0, -1

# KEYS[1] record; ARGV: job bytes, state, ttl ms, "1" when the record must already exist.
# A terminal record is never overwritten; a missing one that should exist was lost (a Redis
# that restarted without persistence), which the caller reports instead of recreating.
_SAVE_LUA = f"""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  if ARGV[4] == '1' then return {RECORD_LOST} end
elseif {" or ".join(f"state == '{s}'" for s in sorted(TERMINAL))} then
  return {ALREADY_ENDED}
end
redis.call('HSET', KEYS[1], 'pb', ARGV[1], 'state', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {SAVED}
"""

# Lease outcomes.
RENEWED, LEASE_GONE, LEASE_TAKEN = 1, 0, -1

# KEYS[1] lease; ARGV: owner, ttl ms. Compare and extend in one step.
_RENEW_LUA = f"""
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {RENEWED}
end
if not owner then return {LEASE_GONE} end
return {LEASE_TAKEN}
"""

# KEYS[1] lease; ARGV: owner. Deletes the lease only if it is still ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def spec_fingerprint(spec: jpb.JobSpec) -> str:
    """sha256 (hex) of `spec` as the client sent it, each input blob that carries a digest named
    by its digest and what it holds (media type, dtype, shape), not by its key and generation.

    Why: a reused idempotency key must mean the same request, and a client that retries after
    uploading the same input again gets a new key for the same bytes. Taken before the gateway
    draws a missing seed, so a retry without one still matches; serialized deterministically, so
    map fields (scheduler_config) hash the same in any order."""
    sent = jpb.JobSpec()
    sent.CopyFrom(spec)
    for item in sent.inputs:
        for blob in _input_blobs(item):
            for name in ("key", "generation", "byte_size", "chunk_bytes", "expires_at"):
                blob.ClearField(name)
    return hashlib.sha256(sent.SerializeToString(deterministic=True)).hexdigest()


def _input_blobs(item: jpb.InputSpec) -> list[pb.BlobHandle]:
    """The input's blob handles that carry a digest (an image, latents and their scheduler state)."""
    source = item.WhichOneof("source")
    if source == "blob":
        blobs = [item.blob]
    elif source == "latents":
        latents = item.latents
        has_state = latents.HasField("scheduler") and latents.scheduler.HasField("state")
        blobs = [latents.blob] + ([latents.scheduler.state] if has_state else [])
    else:
        return []
    return [b for b in blobs if b.digest]


def deadline_of(job: jpb.Job, default_timeout_s: float) -> float:
    """The job's deadline as a time.time()."""
    return job.created_at.ToNanoseconds() / 1e9 + (job.spec.timeout_s or default_timeout_s)


class JobStore:
    def __init__(self, client: Any, *, prefix: str = "baton", retention_s: float = 86400.0):
        self.redis = client
        self.prefix = prefix
        self.retention_s = retention_s
        self._save = client.register_script(_SAVE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{{{job_id}}}" + (f":{part}" if part else "")

    def _index(self, tenant: str | None = None) -> str:
        """Every job, newest last; or one tenant's."""
        return f"{self.prefix}:jobs" + (f":tenant:{tenant}" if tenant is not None else "")

    @property
    def _active(self) -> str:
        return f"{self.prefix}:jobs:active"

    @property
    def _queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def _deadlines(self) -> str:
        return f"{self.prefix}:queue:deadlines"

    def _ttl_ms(self) -> int:
        return int(self.retention_s * 1000)

    # -- records ---------------------------------------------------------------------------
    async def create(
        self, job: jpb.Job, idempotency_key: str, deadline: float, fingerprint: str = ""
    ) -> tuple[jpb.Job, bool]:
        """Records and queues `job`, or returns the job an earlier Submit with the same key and
        spec (`fingerprint`, see spec_fingerprint) made; the same key with another spec is
        FailedPrecondition."""
        if idempotency_key:
            # Per tenant: one tenant's key neither finds nor blocks another's job.
            idem = f"{self.prefix}:idem:{{{job.tenant}/{idempotency_key}}}"
            record = f"{job.id} {fingerprint}".rstrip()
            if not await self.redis.set(idem, record, nx=True, px=self._ttl_ms()):
                earlier, _, earlier_print = _text(await self.redis.get(idem)).partition(" ")
                # A record of only a job id predates fingerprints (a rolling upgrade): it matches any spec.
                if earlier_print and fingerprint and earlier_print != fingerprint:
                    raise FailedPrecondition(
                        f"idempotency key {elide(idempotency_key, MAX_NAME_BYTES)!r} was used for another spec "
                        f"(job {earlier}); use a new key, or send the same spec to get that job",
                        field="idempotency_key",
                    )
                return await self.get(earlier), False
        job.state = jpb.JOB_STATE_QUEUED
        job.created_at.CopyFrom(now_ts())
        job.expires_at.CopyFrom(Timestamp(seconds=job.created_at.seconds + int(self.retention_s)))
        await self.save(job, must_exist=False)
        created = job.created_at.ToNanoseconds() / 1e9
        await self.append(job.id, jpb.JobEvent(job_state=jpb.JOB_STATE_QUEUED))
        for index in (self._index(), self._index(job.tenant)):
            await self.redis.zadd(index, {job.id: created})
            await self.redis.zremrangebyscore(index, "-inf", time.time() - self.retention_s)
        await self.redis.sadd(self._active, job.id)
        await self.enqueue(job.id, created, deadline)
        return job, True

    @staticmethod
    def new_job(spec: jpb.JobSpec, idempotency_key: str = "") -> jpb.Job:
        return jpb.Job(id=uuid.uuid4().hex, spec=spec, idempotency_key=idempotency_key)

    async def get(self, job_id: str) -> jpb.Job:
        raw = await self.redis.hget(self._key(job_id), "pb") if job_id else None
        if raw is None:
            raise NotFound(f"job {job_id!r} does not exist or has expired", field="job_id")
        return jpb.Job.FromString(raw)

    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self._key(job_id)))

    async def save(self, job: jpb.Job, *, must_exist: bool = True) -> int:
        """SAVED, ALREADY_ENDED (a terminal record stays as it is) or RECORD_LOST."""
        args = [job.SerializeToString(), int(job.state), self._ttl_ms(), "1" if must_exist else "0"]
        return int(await self._save(keys=[self._key(job.id)], args=args))

    async def list_jobs(
        self, state: int, page_size: int, page_token: str, tenant: str | None = None
    ) -> tuple[list[jpb.Job], str]:
        """Newest first, every tenant's or `tenant`'s; the token is an offset into the index."""
        index = self._index(tenant)
        size = min(max(page_size, 1), 1000) if page_size else 100
        offset = int(page_token or 0)
        jobs: list[jpb.Job] = []
        while len(jobs) < size:
            ids = await self.redis.zrevrange(index, offset, offset + size - 1)
            if not ids:
                return jobs, ""
            offset += len(ids)
            for job_id in ids:
                try:
                    job = await self.get(_text(job_id))
                except NotFound:
                    await self.redis.zrem(index, job_id)
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
        """Events after entry id `after` ("0" for all), waiting up to block_ms for new ones (0: no wait)."""
        streams = {self._key(job_id, "events"): after or "0"}
        # XREAD's BLOCK 0 would wait forever; no BLOCK at all answers at once.
        reply = await self.redis.xread(streams, count=500, block=block_ms if block_ms > 0 else None)
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                event = jpb.JobEvent.FromString(fields[b"e"] if b"e" in fields else fields["e"])
                event.id = _text(entry_id)
                out.append(event)
        return out

    # -- the shared queue ------------------------------------------------------------------
    async def enqueue(self, job_id: str, submitted: float, deadline: float) -> None:
        """Queues a job at its submission time (a re-queued job keeps its place)."""
        await self.redis.zadd(self._queue, {job_id: submitted}, nx=True)
        await self.redis.zadd(self._deadlines, {job_id: deadline})

    async def dequeue(self, job_id: str) -> None:
        await self.redis.zrem(self._queue, job_id)
        await self.redis.zrem(self._deadlines, job_id)

    async def queue_length(self) -> int:
        return int(await self.redis.zcard(self._queue))

    async def queue_head(self, count: int) -> list[tuple[str, float]]:
        """The oldest `count` queued jobs with their submission times."""
        return [(_text(i), float(s)) for i, s in await self.redis.zrange(self._queue, 0, count - 1, withscores=True)]

    async def queued_past(self, now: float) -> list[str]:
        """Queued jobs whose deadline has passed."""
        return [_text(i) for i in await self.redis.zrangebyscore(self._deadlines, "-inf", now)]

    async def position(self, job_id: str) -> int:
        """1-based place in the queue; 0 when not queued."""
        rank = await self.redis.zrank(self._queue, job_id)
        return 0 if rank is None else int(rank) + 1

    async def is_queued(self, job_id: str) -> bool:
        return await self.redis.zscore(self._queue, job_id) is not None

    async def submitted_at(self, job_id: str) -> float | None:
        score = await self.redis.zscore(self._index(), job_id)
        return None if score is None else float(score)

    # -- leases, cancelling, bookkeeping ---------------------------------------------------
    async def acquire(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self.redis.set(self._key(job_id, "lease"), owner, nx=True, px=int(lease_s * 1000)))

    async def renew(self, job_id: str, owner: str, lease_s: float) -> int:
        """RENEWED, LEASE_GONE or LEASE_TAKEN (another gateway holds it)."""
        return int(await self._renew(keys=[self._key(job_id, "lease")], args=[owner, int(lease_s * 1000)]))

    async def holder(self, job_id: str) -> str | None:
        raw = await self.redis.get(self._key(job_id, "lease"))
        return None if raw is None else _text(raw)

    async def drop_lease(self, job_id: str, owner: str) -> None:
        """Lets another gateway take the job now rather than when the lease lapses."""
        await self._release(keys=[self._key(job_id, "lease")], args=[owner])

    async def release(self, job_id: str, owner: str) -> None:
        """A finished job leaves the queue and the active set, then its lease goes."""
        await self.dequeue(job_id)
        await self.redis.srem(self._active, job_id)
        await self.drop_lease(job_id, owner)

    async def active(self) -> list[str]:
        return [_text(i) for i in await self.redis.smembers(self._active)]

    async def forget(self, job_id: str) -> bool:
        """Removes an expired job's id from the active set, the queue and the index; True for the
        one caller (of all replicas) that removed it from the active set."""
        await self.dequeue(job_id)
        await self.redis.zrem(self._index(), job_id)
        return bool(await self.redis.srem(self._active, job_id))

    async def request_cancel(self, job_id: str, reason: str) -> None:
        await self.redis.set(self._key(job_id, "cancel"), reason or "cancelled by the client", px=self._ttl_ms())

    async def cancel_reason(self, job_id: str) -> str | None:
        raw = await self.redis.get(self._key(job_id, "cancel"))
        return None if raw is None else _text(raw)
