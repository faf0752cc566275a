"""What checkpointing a denoise window costs per step, against no checkpoints, in one process.

    .venv/bin/python -m bench.checkpoint [--every 1,5,10] [--steps N] [--repeat N] [--scheduler NAME]

Builds the medium SD 1.x model of bench/denoise.py (UNet (128, 256, 512), 64x64 latents), starts
Redis, and runs the same text-to-image window (with an output key, so it checkpoints) with
checkpoint-every 0 and each given N, interleaved, median of `repeat`. It prints the wall time per
step and its ratio to no checkpoints, and what one checkpoint costs on the denoise thread (the
copy to the CPU) and on the writer thread (serialising and writing to Redis). The default
scheduler is DPM++, whose multistep state travels with the latents: the heaviest checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.blobs import BlobStore
from services.common.redis_conn import connect
from services.denoiser import checkpoints
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from services.devkit.cluster import RedisServer
from services.devkit.tiny_models import build

PROMPT = "a photo of a mountain landscape at night"
SIDE = 512  # pixels: 64x64 latents


class Costs:
    """Seconds spent per checkpoint on the denoise thread (snapshot) and the writer thread (write)."""

    def __init__(self) -> None:
        self.snapshot: list[float] = []
        self.write: list[float] = []
        self._snapshot = checkpoints.snapshot
        self._write = checkpoints.CheckpointWriter.write

    def install(self) -> None:
        def snapshot(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._snapshot(*args, **kwargs)
            finally:
                self.snapshot.append(time.perf_counter() - start)

        def write(writer, name, snap):
            start = time.perf_counter()
            try:
                return self._write(writer, name, snap)
            finally:
                self.write.append(time.perf_counter() - start)

        checkpoints.snapshot = snapshot  # type: ignore[assignment]
        checkpoints.CheckpointWriter.write = write  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", default="1,5,10", help="checkpoint-every values to compare with 0")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
    args = parser.parse_args()
    values = [0, *(int(v) for v in args.every.split(","))]
    costs = Costs()
    costs.install()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build("sd1", root / "sd1-medium", size="medium")
        redis = RedisServer(root / "redis").start()
        try:
            store = BlobStore(connect(redis.url, "no"))
            cache = ModelCache(load_model, defaults=LoadOptions(), max_models=1)
            engines = {n: DenoiseEngine(store, cache, checkpoint_every=n) for n in values}
            req = dpb.DenoiseRequest(model=str(model), prompt=PROMPT, steps=args.steps, seed=1, width=SIDE,
                                     height=SIDE, scheduler=args.scheduler, output_key="bench/window")  # fmt: skip

            def run(n: int) -> float:
                start = time.perf_counter()
                engines[n].denoise(req)
                return (time.perf_counter() - start) / args.steps

            run(0)  # load and warm
            per_step: dict[int, list[float]] = {n: [] for n in values}
            for round_ in range(args.repeat):  # interleaved, so drift hits every value alike
                for n in values:
                    per_step[n].append(run(n))
                times = ", ".join(f"{n}: {per_step[n][-1]:.4f}" for n in values)
                print(f"round {round_ + 1}/{args.repeat}, s/step by checkpoint-every: {times}", flush=True)
        finally:
            redis.stop()
    base = statistics.median(per_step[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.scheduler}, {args.steps} steps, "
          f"64x64 latents, median of {args.repeat}")  # fmt: skip
    snap, write = statistics.median(costs.snapshot), statistics.median(costs.write)
    print(f"one checkpoint: {snap * 1e3:.3f} ms on the denoise thread ({snap / base:.3%} of a step), "
          f"{write * 1e3:.3f} ms on the writer thread ({write / base:.3%} of a step)")  # fmt: skip
    print(f"{'every':>6} {'s/step':>9} {'ratio':>7} {'thread cost/step':>17}")
    for n in values:
        step = statistics.median(per_step[n])
        thread = snap / n if n else 0.0
        print(f"{n:>6} {step:>9.4f} {step / base:>7.4f} {thread / base:>16.4%}", flush=True)


if __name__ == "__main__":
    main()
