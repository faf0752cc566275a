"""Gateway memory for a big PutBlob and GetBlob: its peak RSS growth relative to the blob's size.

    .venv/bin/python -m bench.blob_stream [--mib N ...] [--repeat N]

Starts a Redis and a gateway, puts a blob of N MiB through the gateway in 1 MiB messages and reads
it back, sampling the gateway's VmRSS every 2 ms. Prints, per size and RPC, the time, the peak RSS
growth over the RPC and its ratio to the blob size (the target: a few chunks, not the blob, so the
ratio falls as the blob grows; buffering the whole upload was 2.45x).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from services.client.sync_client import OPTIONS
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import OCTET, BlobStore
from services.common.redis_conn import connect
from services.devkit.cluster import RedisServer, ServiceProcess

MIB = 1 << 20


def rss(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


def peak_growth(pid: int, fn) -> tuple[float, int]:
    """Seconds `fn` took and the peak RSS growth of process `pid` while it ran."""
    base, peak, done = rss(pid), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    fn()
    took = time.perf_counter() - started
    done.set()
    sampler.join()
    return took, max(peak[0], rss(pid)) - base


def messages(data: bytes) -> Iterator[gpb.BlobChunk]:
    yield gpb.BlobChunk(header=pb.BlobHandle(media_type=OCTET))
    view = memoryview(data)
    for start in range(0, len(view), MIB):
        yield gpb.BlobChunk(data=bytes(view[start : start + MIB]))


def run(stub: gateway_pb2_grpc.GatewayStub, store: BlobStore, pid: int, mib: int) -> None:
    data = os.urandom(mib * MIB)
    handles: list[pb.BlobHandle] = []
    put_s, put_rss = peak_growth(pid, lambda: handles.append(stub.PutBlob(messages(data), timeout=300)))
    received = [0]

    def get() -> None:
        for message in stub.GetBlob(gpb.GetBlobRequest(blob=handles[0]), timeout=300):
            received[0] += len(message.data)

    get_s, get_rss = peak_growth(pid, get)
    assert received[0] == len(data)
    store.delete(handles[0])
    for rpc, took, growth in (("PutBlob", put_s, put_rss), ("GetBlob", get_s, get_rss)):
        ratio = growth / len(data)
        print(f"{mib:>5} MiB {rpc:>8} {took:>7.2f}s {growth / MIB:>9.1f} MiB {ratio:>6.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, nargs="+", default=[96], help="blob sizes in MiB")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every size")
    args = parser.parse_args()
    with (
        RedisServer() as redis_server,
        ServiceProcess("gateway", redis_server.url, {"BATON_LOG_FORMAT": "text"}) as gateway,
        grpc.insecure_channel(gateway.address, options=OPTIONS) as channel,
    ):
        store = BlobStore(connect(redis_server.url, "no"))
        stub = gateway_pb2_grpc.GatewayStub(channel)
        print(f"gateway chunk {store.chunk_bytes >> 20} MiB, 1 MiB messages, peak VmRSS growth per RPC")
        print(f"{'blob':>9} {'rpc':>8} {'time':>8} {'RSS growth':>13} {'ratio':>6}")
        for _ in range(args.repeat):
            for mib in args.mib:
                run(stub, store, gateway.pid, mib)


if __name__ == "__main__":
    main()
