"""WorkerRegistry: where the workers are, in Redis, kept fresh by heartbeats.

Each worker writes its WorkerInfo under <prefix>:worker:<kind>:<id> with a TTL and scores
its id by expiry in the <prefix>:workers:<kind> sorted set. A worker that stops
heartbeating drops out within one TTL; one that drains withdraws at once.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.redis_conn import Client


def new_worker_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class WorkerRegistry:
    def __init__(self, client: Client, *, prefix: str = "baton", ttl_s: float = 10.0):
        self.redis = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, kind: str, worker_id: str) -> str:
        return f"{self.prefix}:worker:{kind}:{worker_id}"

    def _index(self, kind: str) -> str:
        return f"{self.prefix}:workers:{kind}"

    def announce(self, info: wpb.WorkerInfo) -> None:
        """Writes (or refreshes) a worker's record for one TTL."""
        now = time.time()
        info.heartbeat_at.CopyFrom(Timestamp(seconds=int(now), nanos=int(now % 1 * 1e9)))
        ttl_ms = int(self.ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._key(info.kind, info.worker_id), info.SerializeToString(), px=ttl_ms)
        pipe.zadd(self._index(info.kind), {info.worker_id: int(now * 1000) + ttl_ms})
        pipe.execute()

    def withdraw(self, kind: str, worker_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.unlink(self._key(kind, worker_id))
        pipe.zrem(self._index(kind), worker_id)
        pipe.execute()

    def workers(self, kind: str) -> list[wpb.WorkerInfo]:
        """Live workers of a kind."""
        index = self._index(kind)
        self.redis.zremrangebyscore(index, "-inf", int(time.time() * 1000))
        ids = [i.decode() if isinstance(i, bytes) else i for i in cast(list, self.redis.zrange(index, 0, -1))]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.get(self._key(kind, worker_id))
        out = []
        for raw in pipe.execute():
            if raw is not None:
                out.append(wpb.WorkerInfo.FromString(raw))
        return out
