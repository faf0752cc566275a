"""Connects to a single Redis or a Redis Cluster from one URL."""

from __future__ import annotations

import redis
from redis._parsers import Encoder
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer

from services.common.errors import Unavailable

Client = redis.Redis | RedisCluster


def connect(url: str, cluster: str = "auto") -> Client:
    """A client for `url`; cluster is "yes", "no", or "auto" (ask the server's INFO)."""
    if cluster == "auto":
        probe = redis.Redis.from_url(url)
        try:
            enabled = probe.info("cluster").get("cluster_enabled") == 1
        except redis.ConnectionError as exc:
            raise Unavailable(f"cannot reach Redis at {redact(url)}: {exc}") from exc
        finally:
            probe.close()
        cluster = "yes" if enabled else "no"
    if cluster == "yes":
        return RedisCluster.from_url(url, command_packer=_zero_copy_packer())
    return redis.Redis.from_url(url, command_packer=_zero_copy_packer())


def connect_async(url: str, cluster: str = "auto"):
    """An asyncio client for `url` (same cluster detection as `connect`)."""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    if cluster == "auto":
        probe = connect(url, "auto")
        cluster = "yes" if isinstance(probe, RedisCluster) else "no"
        probe.close()
    if cluster == "yes":
        return AsyncRedisCluster.from_url(url)
    return aredis.Redis.from_url(url)


def _zero_copy_packer() -> PythonRespSerializer:
    """redis-py's hiredis packer copies every memoryview into bytes first; the pure-Python one
    sends big values straight from the tensor's memory. Replies are still parsed by hiredis."""
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}"
