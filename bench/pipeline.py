"""A two-stage cooperative job through a warm local cluster vs. the same steps in process.

    .venv/bin/python -m bench.pipeline [--configs tiny,medium] [--steps N] [--repeat N] [--jobs N]

Model A runs the first 60% of the schedule, model B the rest (random SD 1.x models: tiny at
32x32 latents, medium with a (128, 256, 512) UNet at 64x64). In process, diffusers' own
components run the same two windows (encode prompt, draw noise, step) with nothing in
between; through the cluster, the gateway plans the job, routes both stages to the denoiser,
hands the latents over in Redis and streams progress. Ratio = cluster / in process (target:
1.05 or better for one medium job). Then N tiny jobs are submitted at once.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from google.protobuf import json_format

from bench.timing import median_time
from services.client import BatonClient
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.devkit.cluster import LocalCluster
from services.devkit.tiny_models import build

SIDES = {"tiny": 64, "medium": 512}
PROMPT = "a photo of a mountain landscape at night"
SPLIT = 0.6


def spec(config: str, steps: int, seed: int = 1) -> jpb.JobSpec:
    stages = [
        {"name": "a", "denoise": {"model": f"{config}-a", "prompt": PROMPT, "steps": steps, "denoising_end": SPLIT}},
        {"name": "b", "denoise": {"model": f"{config}-b", "prompt": PROMPT, "steps": steps, "latents": "a"}},
    ]
    side = SIDES[config]
    return json_format.ParseDict({"name": "bench", "seed": seed, "width": side, "height": side, "stages": stages},
                                 jpb.JobSpec())  # fmt: skip


@torch.no_grad()
def window(pipe, steps: int, start: float, end: float, latents, seed: int, side: int):
    """One window of the schedule with diffusers' components, as a pipeline runs it."""
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, None)
    embeds = torch.cat([uncond, cond])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    ts, T = scheduler.timesteps, scheduler.config.num_train_timesteps
    begin = len(ts) - int((ts < round(T - start * T)).sum()) if start else 0
    stop = int((ts >= round(T - end * T)).sum()) if end < 1 else len(ts)
    scheduler.set_begin_index(begin)
    if latents is None:
        vsf = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        shape = (1, 4, side // vsf, side // vsf)
        latents = randn_tensor(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    for t in ts[begin:stop]:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        u, c = pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
        latents = scheduler.step(u + 7.5 * (c - u), t, latents, return_dict=False)[0]
    return latents


def run_job(address: str, job: jpb.JobSpec) -> None:
    with BatonClient(address) as client:
        submitted = client.submit(job)
        for _ in client.watch(submitted.id):
            pass
        assert client.get(submitted.id).state == jpb.JOB_STATE_SUCCEEDED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,medium")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {f"{c}-{m}": build("sd1", Path(tmp) / c / m, size=c, seed=i) for c in configs for i, m in
                 enumerate("ab")}  # fmt: skip
        env = {
            "BATON_MODELS": ",".join(f"{k}={v}" for k, v in paths.items()),
            "BATON_PRELOAD": ",".join(paths),
            "BATON_MAX_MODELS": str(len(paths)),  # all stay resident: time the jobs, not reloads
            "HF_HUB_OFFLINE": "1",
        }
        with LocalCluster(log_dir=Path(tmp) / "logs", env=env, default_ports=False) as cluster:
            address = cluster.address("gateway")
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps split at {SPLIT}")
            print(f"{'config':>8} {'in process':>11} {'cluster':>10} {'ratio':>6}")
            for config in configs:
                a = StableDiffusionPipeline.from_pretrained(paths[f"{config}-a"])
                b = StableDiffusionPipeline.from_pretrained(paths[f"{config}-b"])
                side = SIDES[config]

                def in_process(a=a, b=b, side=side):
                    handoff = window(a, args.steps, 0.0, SPLIT, None, 1, side)
                    window(b, args.steps, SPLIT, 1.0, handoff, 1, side)

                job = spec(config, args.steps)
                in_process(), run_job(address, job)  # warm both
                base = median_time(in_process, args.repeat)
                ours = median_time(lambda job=job: run_job(address, job), args.repeat)
                print(f"{config:>8} {base:>10.3f}s {ours:>9.3f}s {ours / base:>6.3f}", flush=True)
            if "tiny" in configs and args.jobs:
                jobs = [spec("tiny", args.steps, seed=i) for i in range(args.jobs)]
                start = time.perf_counter()
                with ThreadPoolExecutor(args.jobs) as pool:
                    list(pool.map(lambda j: run_job(address, j), jobs))
                wall = time.perf_counter() - start
                one = median_time(lambda: run_job(address, jobs[0]), args.repeat)
                print(f"{args.jobs} tiny jobs at once: {wall:.2f}s wall, {wall / args.jobs:.3f}s per job "
                      f"(one alone: {one:.3f}s; {args.jobs * one / wall:.2f}x of running them one by one)")  # fmt: skip


if __name__ == "__main__":
    main()
