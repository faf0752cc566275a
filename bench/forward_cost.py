"""What batching can buy on this device: a diffusers pipeline's cost per image at batch 1, 2, 4, 8.

    .venv/bin/python -m bench.forward_cost [--families sd1,flux] [--configs tiny,medium]
                                           [--batches 1,2,4,8] [--steps 2] [--device cpu]

Step-level batching (bench/batching.py) shares each step's forward among windows; it can only
gain what one larger forward saves over several small ones. This measures that ceiling with no
Baton code in the way: the family's diffusers pipeline, in process, latents out
(output_type="latent", so no VAE), `num_images_per_prompt=B`, from the tiny-model kit's configs.
Printed per batch: ms per image and the speed-up per image against batch 1 run in the same
process. Where it stays near 1.0x the device is compute-bound at that size and batching windows
cannot raise throughput (on a 2-core CPU: sd1 medium at 512 px); where it grows, bench/batching.py
should show the same growth through the cluster.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from services.devkit.tiny_models import build

SIDES = {"tiny": 64, "medium": 512}
REPEATS = 2


def per_image(pipe: DiffusionPipeline, batch: int, side: int, steps: int) -> float:
    """Seconds per image of one pipeline call making `batch` images (the best of REPEATS)."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        pipe(
            prompt="a lighthouse on a rocky coast at dusk",
            num_images_per_prompt=batch,
            num_inference_steps=steps,
            height=side,
            width=side,
            output_type="latent",
        )
        best = min(best, time.perf_counter() - start)
    return best / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd1,flux")
    parser.add_argument("--configs", default="tiny,medium")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.device}, {args.steps} steps", flush=True)
    print(f"{'family':>6} {'config':>7} {'batch':>5} {'ms/image':>9} {'per image vs batch 1':>21}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for family in args.families.split(","):
            for config in args.configs.split(","):
                path = build(family, Path(tmp) / family / config, size=config)
                pipe = DiffusionPipeline.from_pretrained(path).to(args.device)
                pipe.set_progress_bar_config(disable=True)
                side = SIDES[config]
                per_image(pipe, 1, side, args.steps)  # warm-up
                base = per_image(pipe, 1, side, args.steps)
                for batch in batches:
                    cost = base if batch == 1 else per_image(pipe, batch, side, args.steps)
                    print(f"{family:>6} {config:>7} {batch:>5} {cost * 1000:>9.0f} {base / cost:>20.2f}x", flush=True)
                del pipe


if __name__ == "__main__":
    main()
