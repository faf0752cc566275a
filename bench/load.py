"""Many jobs at once through one and two gateways: success, throughput, latency, queue wait.

    .venv/bin/python -m bench.load [--jobs 200] [--denoisers 1] [--gateways 1,2] [--steps 4]

Every job is one tiny SD 1.x window. First the serial rate: jobs one after another through
one gateway and one denoiser (warm), each submitted once the last has ended. Then, for each
gateway count, all N jobs are submitted at once (spread over the gateways) to a cluster with
D denoisers at their default limits (torch threads: cores / D), and watched to their end. Printed per run: success rate,
throughput (jobs/s), its ratio to D x the serial rate (target: 0.9 or better), and p50/p95
of latency (submit to end) and queue wait (submit to running). On a 2-core machine the
denoisers, gateways and Redis share the cores, so D > 1 cannot scale there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from google.protobuf import json_format

from services.client import AsyncBatonClient
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.devkit.cluster import LocalCluster
from services.devkit.tiny_models import build


def spec(steps: int, seed: int) -> jpb.JobSpec:
    stage = {"name": "a", "denoise": {"model": "tiny", "prompt": "a lighthouse", "steps": steps}}
    return json_format.ParseDict({"name": "load", "seed": seed, "stages": [stage]}, jpb.JobSpec())


async def one(client: AsyncBatonClient, job: jpb.JobSpec) -> jpb.Job:
    submitted = await client.submit(job)
    async for _ in client.watch(submitted.id):
        pass
    return await client.get(submitted.id)


async def serial_rate(address: str, steps: int, count: int) -> float:
    async with AsyncBatonClient(address) as client:
        await one(client, spec(steps, 0))  # warm
        start = time.perf_counter()
        for i in range(count):
            await one(client, spec(steps, i))
        return count / (time.perf_counter() - start)


async def burst(addresses: list[str], steps: int, count: int) -> tuple[list[jpb.Job], float, int]:
    clients = [AsyncBatonClient(a) for a in addresses]
    start = time.perf_counter()
    errors = 0

    async def submit(i: int) -> jpb.Job | None:
        nonlocal errors
        try:
            return await one(clients[i % len(clients)], spec(steps, i))
        except Exception:
            errors += 1
            return None

    jobs = await asyncio.gather(*(submit(i) for i in range(count)))
    wall = time.perf_counter() - start
    for client in clients:
        await client.close()
    return [j for j in jobs if j is not None], wall, errors


def seconds(a, b) -> float:
    return (b.ToNanoseconds() - a.ToNanoseconds()) / 1e9


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--denoisers", type=int, default=1)
    parser.add_argument("--gateways", default="1,2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--serial", type=int, default=20, help="jobs timed one by one for the serial rate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build("sd1", Path(tmp) / "tiny", size="tiny")
        # Denoisers sharing the machine split its cores, the serial one included, so that the
        # ratio measures the cluster's orchestration rather than thread contention.
        threads = max(1, (os.cpu_count() or 1) // args.denoisers)
        env = {"BATON_MODELS": f"tiny={model}", "BATON_PRELOAD": "tiny", "HF_HUB_OFFLINE": "1",
               "BATON_LOG_LEVEL": "warning", "BATON_TORCH_THREADS": str(threads)}  # fmt: skip
        with LocalCluster(["gateway", "denoiser"], log_dir=Path(tmp) / "logs", env=env, default_ports=False) as c:
            rate = asyncio.run(serial_rate(c.address("gateway"), args.steps, args.serial))
        print(f"serial rate, 1 gateway, 1 denoiser: {rate:.2f} jobs/s ({args.steps} steps each)")
        print(f"{'gateways':>8} {'denoisers':>9} {'jobs':>5} {'success':>8} {'jobs/s':>7} {'vs D*serial':>11} "
              f"{'p50 lat':>8} {'p95 lat':>8} {'p50 wait':>9} {'p95 wait':>9}")  # fmt: skip
        for gateways in (int(g) for g in args.gateways.split(",")):
            replicas = {"gateway": gateways, "denoiser": args.denoisers}
            logs = Path(tmp) / f"logs-{gateways}"
            with LocalCluster(["gateway", "denoiser"], log_dir=logs, env=env, default_ports=False,
                              replicas=replicas) as cluster:  # fmt: skip
                addresses = [p.address for p in cluster.processes("gateway")]
                asyncio.run(burst(addresses, args.steps, 2))  # warm every gateway's path
                jobs, wall, errors = asyncio.run(burst(addresses, args.steps, args.jobs))
            ok = [j for j in jobs if j.state == jpb.JOB_STATE_SUCCEEDED]
            latency = [seconds(j.created_at, j.finished_at) for j in ok]
            wait = [seconds(j.created_at, j.started_at) for j in ok if j.HasField("started_at")]
            throughput = len(ok) / wall
            print(f"{gateways:>8} {args.denoisers:>9} {args.jobs:>5} {len(ok) / args.jobs:>7.1%} {throughput:>7.2f} "
                  f"{throughput / (args.denoisers * rate):>11.2f} {pct(latency, 50):>7.2f}s {pct(latency, 95):>7.2f}s "
                  f"{pct(wait, 50):>8.2f}s {pct(wait, 95):>8.2f}s", flush=True)  # fmt: skip
            for job in jobs:
                if job.state != jpb.JOB_STATE_SUCCEEDED:
                    print(f"  {job.id}: {jpb.JobState.Name(job.state)} {job.error}")
            if errors:
                print(f"  {errors} calls failed outright")


if __name__ == "__main__":
    main()
