"""The same denoise job through the Denoiser service (warm) and through in-process diffusers.

    .venv/bin/python -m bench.denoise [--configs sd1-tiny,sd1-medium,...] [--steps N] [--repeat N]

Builds random models of each family (sd1, sd3, flux) in two sizes (tiny: diffusers' test
configs at 32x32 latents; medium: e.g. an SD 1.x UNet (128, 256, 512), at 64x64 latents),
starts Redis and a denoiser subprocess, and times a full text-to-image run both ways in the
same run. The ratio is service / diffusers (lower is better; the target is 1.05 or better on
the medium configs). The service time is what a client sees: the gRPC stream of step events,
the window, and the latents written to Redis.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from bench.timing import median_time
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.devkit.cluster import ClusterError, RedisServer, ServiceProcess
from services.devkit.tiny_models import build

SIDES = {"tiny": 64, "medium": 512}  # image side in pixels: 32x32 and 64x64 latents
DEFAULT_CONFIGS = "sd1-tiny,sd1-medium,sd3-tiny,sd3-medium,flux-tiny,flux-medium"
PROMPT = "a photo of a mountain landscape at night"


def start_denoiser(redis_url: str, models: dict[str, Path], log: Path) -> ServiceProcess:
    env = {
        "BATON_MODELS": ",".join(f"{name}={path}" for name, path in models.items()),
        "BATON_PRELOAD": ",".join(models),
        "BATON_MAX_MODELS": str(len(models)),  # all stay resident: time the window, not reloads
        "HF_HUB_OFFLINE": "1",
    }
    denoiser = ServiceProcess("denoiser", redis_url, env, log=log).start()
    try:
        return denoiser.wait_serving(timeout=3600)  # preloading every medium model takes a while
    except ClusterError as exc:
        denoiser.stop()
        raise SystemExit(f"denoiser did not start: {exc}") from exc


def compare(stub, name: str, path: Path, side: int, steps: int, repeat: int) -> tuple[float, float, int]:
    """Median seconds in process and through the service, and the latent side length."""
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    vsf = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    request = dpb.DenoiseRequest(model=name, prompt=PROMPT, steps=steps, seed=1, width=side, height=side)

    def in_process():
        generator = torch.Generator("cpu").manual_seed(1)
        pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="latent", width=side, height=side)

    def through_service():
        events = list(stub.Denoise(request, timeout=3600))
        assert events[-1].HasField("result")

    in_process(), through_service()  # warm both
    return median_time(in_process, repeat), median_time(through_service, repeat), side // vsf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="family-size pairs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {name: build(name.split("-")[0], root / name, size=name.split("-")[1]) for name in configs}
        with RedisServer() as redis:
            denoiser = start_denoiser(redis.url, models, root / "denoiser.log")
            try:
                stub = denoiser_pb2_grpc.DenoiserStub(denoiser.channel)
                threads = torch.get_num_threads()
                print(f"torch {torch.__version__}, {threads} threads, {args.steps} steps, median of {args.repeat}")
                print(f"{'config':>12} {'latents':>8} {'diffusers':>10} {'service':>10} {'ratio':>6}")
                for name in configs:
                    side = SIDES[name.split("-")[1]]
                    base, ours, latent = compare(stub, name, models[name], side, args.steps, args.repeat)
                    print(f"{name:>12} {latent:>5}^2 {base:>9.3f}s {ours:>9.3f}s {ours / base:>6.3f}", flush=True)
            finally:
                denoiser.stop()


if __name__ == "__main__":
    main()
