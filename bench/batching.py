"""Step-level batching: N same-model jobs at once against the same jobs one after another.

    .venv/bin/python -m bench.batching [--families sd1,flux] [--configs tiny,medium]
                                       [--concurrency 1,2,4,8,16] [--steps 4] [--quick]

Each job is one text-to-image denoise window of a random model (tiny: diffusers' test configs
at 32x32 latents; medium: larger networks at 64x64 latents, 512 px), with its own seed and
prompt. For each family and config a local cluster (gateway, and a denoiser with
BATON_CONCURRENCY=16 and the default max-batch) first runs max(N) jobs one after another: the
serial baseline, images/s over all of them, and a job's latency alone (their median). Then, for
each N, it submits the first N of the same jobs at once (a burst, repeated until --burst-time
seconds are spent, at most 5 times: medians). Printed per N: both rates, speed-up =
concurrent / serial, the first submitted job's latency in the burst / alone, and the forwards
the denoiser shared in one burst (its baton_denoise_forwards_total{windows=K} counter:
"K:count", and the mean windows a forward served). A second cluster with batching off
(BATON_MAX_BATCH=1, same concurrency: the windows take turns) runs the N=8 burst as a second
baseline. Targets (issue 17; printed, not asserted): 2x at N=8 on tiny configs, 1.2x on
medium, first-job latency at most 1.1x. --quick: tiny configs, N up to 8 (a couple of minutes
on 2 cores). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf import json_format

from services.client import AsyncBatonClient
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.devkit.cluster import LocalCluster
from services.devkit.tiny_models import build

SIDES = {"tiny": 64, "medium": 512}
TARGETS = {"tiny": 2.0, "medium": 1.2}  # speed-up at N=8
TARGET_N = 8
TARGET_LATENCY = 1.1
CONCURRENCY = 16
MAX_REPEATS = 5
PROMPTS = [
    "a lighthouse on a rocky coast at dusk",
    "a cozy cabin in a snowy forest",
    "a city street at night with neon lights and rain",
    "a red fox in the snow, soft fur",
    "a sailing boat on the ocean with big waves",
    "an owl at night in the forest, moonlight",
    "a bowl of fresh fruit on a kitchen counter",
    "a dragon flying over the mountains",
]
FORWARDS = "baton_denoise_forwards_total{"


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def spec(model: str, side: int, steps: int, i: int) -> jpb.JobSpec:
    stage = {"name": "a", "denoise": {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "steps": steps}}
    job = {"name": f"batching-{i}", "seed": 1000 + i, "width": side, "height": side, "stages": [stage]}
    return json_format.ParseDict(job, jpb.JobSpec())


async def timed(client: AsyncBatonClient, job: jpb.JobSpec) -> float:
    """Seconds from submit to the job's end, as the client sees them."""
    start = time.perf_counter()
    done = await client.wait((await client.submit(job)).id)
    if done.state != jpb.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job {done.id} ended {jpb.JobState.Name(done.state)}: {done.error}")
    return time.perf_counter() - start


async def registered(address: str, model: str, timeout: float = 60.0) -> None:
    """Waits until the gateway sees a denoiser that holds `model`: SERVING comes before registering."""
    async with AsyncBatonClient(address) as client:
        deadline = time.monotonic() + timeout
        while not any(m.model.name == model and m.workers for m in await client.list_models()):
            if time.monotonic() > deadline:
                raise SystemExit(f"no denoiser registered {model} within {timeout:.0f} s")
            await asyncio.sleep(0.1)


async def serial(address: str, jobs: list[jpb.JobSpec]) -> list[float]:
    async with AsyncBatonClient(address) as client:
        return [await timed(client, job) for job in jobs]


async def burst(address: str, jobs: list[jpb.JobSpec]) -> tuple[float, list[float]]:
    """Wall seconds for all `jobs` submitted at once (in order), and each one's latency."""
    async with AsyncBatonClient(address) as client:
        start = time.perf_counter()
        latencies = await asyncio.gather(*(timed(client, job) for job in jobs))
        return time.perf_counter() - start, list(latencies)


def forwards(cluster: LocalCluster) -> dict[str, float]:
    metrics = cluster.processes("denoiser")[0].metrics()
    return {k[len(FORWARDS) :].split('"')[1]: v for k, v in metrics.items() if k.startswith(FORWARDS)}


def shared(before: dict[str, float], after: dict[str, float]) -> str:
    """The burst's forwards by windows served, "K:count ...", and the mean windows per forward."""
    delta = {k: int(after[k] - before.get(k, 0)) for k in after if after[k] > before.get(k, 0)}
    if not delta:
        return "none counted"
    order = sorted(delta, key=lambda k: int(k.rstrip("+")))
    calls = sum(int(k.rstrip("+")) * n for k, n in delta.items())  # "16+" counts as 16
    return " ".join(f"{k}:{delta[k]}" for k in order) + f" (mean {calls / sum(delta.values()):.1f})"


@dataclass
class Row:
    family: str
    config: str
    mode: str
    n: int
    serial: float  # images/s
    concurrent: float
    first: float  # first job's latency in the burst / alone
    forwards: str

    def line(self) -> str:
        speedup = self.concurrent / self.serial
        target = ""
        if self.n == TARGET_N and self.mode == "on" and self.config in TARGETS:
            target = f">={TARGETS[self.config]:.1f}x, <={TARGET_LATENCY:.1f}x"
        return (
            f"{self.family:>6} {self.config:>7} {self.mode:>8} {self.n:>3} {self.serial:>9.2f} {self.concurrent:>9.2f} "
            f"{speedup:>7.2f}x {self.first:>8.2f}x {target:>15}  {self.forwards}"
        )


HEADER = (
    f"{'family':>6} {'config':>7} {'batching':>8} {'N':>3} {'serial/s':>9} {'concur/s':>9} {'speedup':>8} "
    f"{'1st lat':>9} {'target (N=8)':>15}  shared forwards (windows:count)"
)


def measure(
    family: str, config: str, path: Path, mode: str, ns: list[int], steps: int, burst_s: float, logs: Path
) -> tuple[list[Row], float]:
    """A cluster with batching `mode` ("on" or "off") serving the model at `path`, and its sweep."""
    model = f"{family}-{config}"
    env = {
        "BATON_MODELS": f"{model}={path}",
        "BATON_PRELOAD": model,
        "HF_HUB_OFFLINE": "1",
        "BATON_LOG_LEVEL": "warning",
        "BATON_CONCURRENCY": str(CONCURRENCY),
    }
    if mode == "off":
        env["BATON_MAX_BATCH"] = "1"
    with LocalCluster(["gateway", "denoiser"], log_dir=logs / f"{model}-{mode}", env=env, default_ports=False) as c:
        return sweep(c, family, config, mode, model, SIDES[config], ns, steps, burst_s)


def sweep(
    cluster: LocalCluster,
    family: str,
    config: str,
    mode: str,
    model: str,
    side: int,
    ns: list[int],
    steps: int,
    burst_s: float,
) -> tuple[list[Row], float]:
    """The serial baseline, then bursts of each N, through the cluster's gateway and its first
    denoiser (which serves `model`). Returns the rows and the median latency of a job alone."""
    address = cluster.address("gateway")
    jobs = [spec(model, side, steps, i) for i in range(max(ns))]
    progress(f"{model} batching {mode}: warming up")
    asyncio.run(registered(address, model))
    asyncio.run(burst(address, [spec(model, side, steps, 100 + i) for i in range(2)]))
    progress(f"{model} batching {mode}: {len(jobs)} jobs one after another")
    latencies = asyncio.run(serial(address, jobs))
    rate, alone = len(jobs) / sum(latencies), statistics.median(latencies)
    rows = []
    for n in ns:
        walls, firsts = [], []
        before = forwards(cluster)
        # A tiny burst takes a fraction of a second: repeat it (median) until burst_s is spent.
        while not walls or (sum(walls) < burst_s and len(walls) < MAX_REPEATS):
            progress(f"{model} batching {mode}: {n} jobs at once ({len(walls) + 1})")
            wall, each = asyncio.run(burst(address, jobs[:n]))
            walls.append(wall)
            firsts.append(each[0])
            if len(walls) == 1:  # the shared forwards of one burst
                counted = shared(before, forwards(cluster)) if mode == "on" else "-"
        wall, first = statistics.median(walls), statistics.median(firsts)
        rows.append(Row(family, config, mode, n, rate, n / wall, first / alone, counted))
    return rows, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd1,flux")
    parser.add_argument("--configs", default=None, help="tiny,medium (--quick: tiny)")
    parser.add_argument("--concurrency", default=None, help="jobs at once, comma-separated (default 1,2,4,8,16)")
    parser.add_argument("--steps", type=int, default=4, help="steps per job")
    parser.add_argument("--burst-time", type=float, default=3.0, help="repeat each burst until this many seconds")
    parser.add_argument("--quick", action="store_true", help="tiny configs, N up to 8")
    args = parser.parse_args()
    configs = (args.configs or ("tiny" if args.quick else "tiny,medium")).split(",")
    ns = [int(n) for n in (args.concurrency or ("1,2,4,8" if args.quick else "1,2,4,8,16")).split(",")]
    steps = args.steps
    if max(ns) > CONCURRENCY:
        raise SystemExit(f"--concurrency: at most {CONCURRENCY} (the denoiser's BATON_CONCURRENCY)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps} steps a job, one window each; "
          f"denoiser BATON_CONCURRENCY={CONCURRENCY}, max-batch default (on) or 1 (off)", flush=True)  # fmt: skip
    print("serial/s: images/s one job after another; concur/s: N at once; 1st lat: the first job's latency "
          "in the burst / the median alone", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    results: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for config in configs:
                progress(f"building {family} {config}")
                path = build(family, Path(tmp) / family / config, size=config)
                started = time.perf_counter()
                logs = Path(tmp) / "logs"
                rows, alone = measure(family, config, path, "on", ns, steps, args.burst_time, logs)
                progress(f"{family} {config}: one job alone {alone:.2f}s (median)")
                if TARGET_N in ns:
                    off, _ = measure(family, config, path, "off", [TARGET_N], steps, args.burst_time, logs)
                    rows += off
                results += rows
                progress(f"{family} {config} done in {time.perf_counter() - started:.0f}s")
                for row in rows:
                    print(row.line(), flush=True)
    summary(results)


def summary(rows: list[Row]) -> None:
    """Batching on against off at N=8, per family and config."""
    at = {(r.family, r.config, r.mode): r for r in rows if r.n == TARGET_N}
    for (family, config, mode), on in at.items():
        off = at.get((family, config, "off"))
        if mode == "on" and off is not None:
            ratio = on.concurrent / off.concurrent
            print(f"{family} {config} N={TARGET_N}: batching on {on.concurrent:.2f} images/s, "
                  f"off {off.concurrent:.2f} images/s: on/off {ratio:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
