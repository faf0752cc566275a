"""Connects to a single Redis or a Redis Cluster from one URL, with timeouts and retries.

The URL carries everything about the connection: an ACL user and password
(`redis://baton:PASSWORD@host:6379/0`), and for TLS `rediss://` with redis-py's query
parameters (`?ssl_ca_certs=/ca.pem&ssl_certfile=/client.crt&ssl_keyfile=/client.key`).
Every client Baton makes has a connect and a socket timeout (a frozen Redis fails a command
within `timeout_s` instead of hanging it) and retries a dropped connection a few times with
jittered backoff (a restarting Redis is waited out briefly). Longer outages surface as
`REDIS_DOWN` errors, which the interceptor answers with UNAVAILABLE.
"""

from __future__ import annotations

import logging

import redis
from redis._parsers import Encoder
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer

from services.common.errors import Unavailable

log = logging.getLogger("baton.redis")

Client = redis.Redis | RedisCluster

# Redis is away or not ready: a restart, a failover, a network blip, an AOF being loaded.
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)
# Retried inside the client: a refused or reset connection (Redis restarting) is worth a few
# quick tries; a timeout (Redis frozen) is not, or a frozen Redis would hold every call for
# several timeouts.
RETRIED = (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError)
DEFAULT_TIMEOUT_S = 3.0
# Retries of one command on a dropped connection: about half a second in all.
RETRIES = 3
# URLs whose refused CLUSTER INFO was logged: a gateway asks twice (a sync and an asyncio client).
_SAID_SINGLE: set[str] = set()


def _options(timeout_s: float) -> dict:
    from redis.retry import Retry

    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.05), RETRIES, RETRIED),
        "health_check_interval": 15,
    }


def _async_options(timeout_s: float) -> dict:
    from redis.asyncio.retry import Retry

    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.05), RETRIES, RETRIED),
    }


def connect(url: str, cluster: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Client:
    """A client for `url`; cluster is "yes", "no", or "auto" (ask the server's CLUSTER INFO)."""
    if cluster == "auto":
        cluster = "yes" if _is_cluster(url, timeout_s) else "no"
    options = _options(timeout_s)
    if cluster == "yes":
        options.pop("health_check_interval")
        return RedisCluster.from_url(url, command_packer=_zero_copy_packer(), **options)
    return redis.Redis.from_url(url, command_packer=_zero_copy_packer(), **options)


def connect_async(url: str, cluster: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, max_connections: int = 100):
    """An asyncio client for `url` (same cluster detection, timeouts and retries as `connect`).
    `max_connections` bounds its pool (per node of a cluster); past it a call fails at once, so
    size it for every call that may hold a connection at the same time (blocking stream reads)."""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    if cluster == "auto":
        cluster = "yes" if _is_cluster(url, timeout_s) else "no"
    if cluster == "yes":
        return AsyncRedisCluster.from_url(url, max_connections=max_connections, **_async_options(timeout_s))
    return aredis.Redis.from_url(url, max_connections=max_connections, **_async_options(timeout_s))


def _is_cluster(url: str, timeout_s: float) -> bool:
    """Asks CLUSTER INFO, not INFO: a least-privilege ACL user may be allowed the one and not the
    other. A refused or unknown CLUSTER INFO means a single server (a cluster client would need
    CLUSTER SLOTS too), said once in the log."""
    probe = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        probe.execute_command("CLUSTER", "INFO")
        return True
    except REDIS_DOWN as exc:
        raise Unavailable(f"cannot reach Redis at {redact(url)}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:
        if "cluster support disabled" not in str(exc) and url not in _SAID_SINGLE:
            _SAID_SINGLE.add(url)
            log.info(
                "Redis at %s answered CLUSTER INFO with %r; using it as a single server "
                "(set redis-cluster to yes or no to skip this question)",
                redact(url),
                str(exc),
            )
        return False
    finally:
        probe.close()


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
