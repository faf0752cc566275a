"""Blob store put+get against raw redis-py SET+GET of the same bytes, in the same run.

    .venv/bin/python -m bench.blobs [--repeat N] [--redis-url URL]

Prints, per size, the median time of both and the ratio raw / baton (1.0 = as fast as raw
redis-py; the target is 0.8 or better at every size).
"""

from __future__ import annotations

import argparse

import redis
import torch

from bench.timing import median_time
from services.common.blobs import BlobStore
from services.common.redis_conn import connect
from services.common.tensors import tensor_bytes
from services.devkit.cluster import RedisServer

SIZES = [("256 KiB", 256 << 10), ("1 MiB", 1 << 20), ("16 MiB", 16 << 20), ("256 MiB", 256 << 20)]


def measure(client: redis.Redis, store: BlobStore, size: int, repeat: int) -> tuple[float, float]:
    """Median seconds of raw SET+GET and of BlobStore put+get for `size` bytes."""
    t = torch.randn(size // 4)
    data = bytes(tensor_bytes(t)[0])
    handles: list = []
    keys: list[str] = []

    # Both write a fresh key each time, as stage outputs are, and free it outside the timing,
    # so both pay the same allocation in Redis.
    def raw():
        keys.append(f"bench:raw:{len(keys)}")
        client.set(keys[-1], data, ex=600)
        assert len(client.get(keys[-1])) == size

    def raw_free():
        client.unlink(keys[-1])

    def baton():
        handles.append(store.put_tensor(t))
        assert store.get_tensor(handles[-1]).numel() == t.numel()

    def baton_free():
        store.delete(handles.pop())

    raw(), raw_free(), baton(), baton_free()  # warm up connections and allocators
    return median_time(raw, repeat, raw_free), median_time(baton, repeat, baton_free)


def run(url: str, repeat: int) -> None:
    client = redis.Redis.from_url(url)  # plain redis-py, as a user would write it
    store = BlobStore(connect(url, "no"))
    hiredis = redis.utils.HIREDIS_AVAILABLE
    print(f"redis-py {redis.__version__}, hiredis {hiredis}, chunk {store.chunk_bytes >> 20} MiB, median of {repeat}")
    print(f"{'size':>8} {'raw SET+GET':>12} {'baton put+get':>14} {'ratio':>6}")
    for label, size in SIZES:
        raw_s, baton_s = measure(client, store, size, repeat if size < (64 << 20) else max(3, repeat // 4))
        print(f"{label:>8} {raw_s * 1e3:>10.2f}ms {baton_s * 1e3:>12.2f}ms {raw_s / baton_s:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = parser.parse_args()
    if args.redis_url:
        run(args.redis_url, args.repeat)
        return
    with RedisServer() as server:
        run(server.url, args.repeat)


if __name__ == "__main__":
    main()
