"""How long a Cancel takes to stop a denoise window inside a long step, against the step itself.

    .venv/bin/python -m bench.cancel [--side 512] [--at 0.1,0.5,0.9] [--repeat 3]

Builds the tiny SD 1.x model (its VAE scales by 2, so 512 px are 256x256 latents: the latents of a
real SD 1.x model's 2048x2048 image) and, in one process, times one full step of a text-to-image
window at `side` px and the longest stretch between two cancel checks inside it (the most a cancel
can wait: the network's longest block). Then it cancels windows from another thread at each given
fraction of that step, `repeat` times each, and prints the seconds from the cancel to the window's
end (when its worker is free again), and their ratio to the step.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.blobs import BlobStore
from services.common.errors import Cancelled
from services.common.redis_conn import connect
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from services.devkit.cluster import RedisServer
from services.devkit.tiny_models import build

PROMPT = "a photo of a mountain landscape at night"


class Checks:
    """A `cancelled` callable that notes when the window asks (before a step, before a block) and
    turns true when told to."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.flag = threading.Event()

    def __call__(self) -> bool:
        self.asked.append(time.monotonic())
        return self.flag.is_set()


def full_step(engine: DenoiseEngine, req: dpb.DenoiseRequest) -> tuple[float, float, int]:
    """(seconds of one whole step, the longest stretch between two checks in it, checks per step)."""
    checks, ended = Checks(), []
    one = dpb.DenoiseRequest()
    one.CopyFrom(req)
    one.steps = 1
    engine.denoise(one, on_step=lambda e: ended.append(time.monotonic()), cancelled=checks)
    times = [*checks.asked, ended[0]]
    return ended[0] - checks.asked[0], max(b - a for a, b in itertools.pairwise(times)), len(checks.asked)


def cancelled_after(engine: DenoiseEngine, req: dpb.DenoiseRequest, delay: float) -> float:
    """Seconds from a cancel `delay` s into the first step to the window's end."""
    checks = Checks()
    cancel_at: list[float] = []

    def cancel() -> None:
        while not checks.asked:  # the first ask is before step 1
            time.sleep(0.001)
        time.sleep(max(checks.asked[0] + delay - time.monotonic(), 0.0))
        cancel_at.append(time.monotonic())
        checks.flag.set()

    threading.Thread(target=cancel, daemon=True).start()
    try:
        engine.denoise(req, cancelled=checks)
    except Cancelled:
        return time.monotonic() - cancel_at[0]
    raise AssertionError("the window was not cancelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=512, help="image width and height in pixels")
    parser.add_argument("--at", default="0.1,0.5,0.9", help="fractions of a step at which to cancel")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    fractions = [float(f) for f in args.at.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build("sd1", root / "sd1")
        redis = RedisServer(root / "redis").start()
        try:
            store = BlobStore(connect(redis.url, "no"))
            engine = DenoiseEngine(store, ModelCache(load_model, defaults=LoadOptions(), max_models=1))
            req = dpb.DenoiseRequest(model=str(model), prompt=PROMPT, steps=4, seed=1, width=args.side,
                                     height=args.side)  # fmt: skip
            engine.cache.load(str(model))
            step, longest, checks = full_step(engine, req)
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny SD 1.x at {args.side}x"
                  f"{args.side} px ({args.side // 2}x{args.side // 2} latents), guidance on (batch 2)")  # fmt: skip
            print(f"one step: {step:.2f} s, {checks} cancel checks; longest stretch between two: {longest:.2f} s "
                  f"({longest / step:.1%} of the step)", flush=True)  # fmt: skip
            waits: dict[float, list[float]] = {f: [] for f in fractions}
            for round_ in range(args.repeat):
                for f in fractions:
                    waits[f].append(cancelled_after(engine, req, f * step))
                line = ", ".join(f"{f:.0%}: {waits[f][-1]:.2f} s" for f in fractions)
                print(f"round {round_ + 1}/{args.repeat}, cancel to free by when in the step: {line}", flush=True)
        finally:
            redis.stop()
    print(f"{'cancel at':>9} {'to free, s (each)':>24} {'median':>7} {'/ step':>7}")
    for f in fractions:
        each = " ".join(f"{w:.2f}" for w in waits[f])
        median = statistics.median(waits[f])
        print(f"{f:>9.0%} {each:>24} {median:>7.2f} {median / step:>7.1%}")
    worst = max(w for ws in waits.values() for w in ws)
    print(f"worst: {worst:.2f} s from the cancel to a free worker, {worst / step:.1%} of a {step:.2f} s step")


if __name__ == "__main__":
    main()
