"""Real-size SD 1.5, SDXL and Flux-dev (random weights) on one GPU: the service against
in-process diffusers, a two-stage job, batching throughput and GPU memory.

    python -m bench.gpu [--steps 8] [--repeat 3] [--dtype bfloat16]    # one H100/H200, < 5 min
    python -m bench.gpu --smoke                                       # the same code on the CPU

Builds each model with diffusers' and transformers' classes from the published configs (SD 1.5
UNet and VAE with CLIP ViT-L; SDXL base UNet with CLIP ViT-L and OpenCLIP bigG; Flux-dev's
transformer with CLIP ViT-L and T5-XXL), random weights in --dtype, saves them with
save_pretrained into a temporary folder (/dev/shm when it has room) and serves them from a
local cluster (gateway, denoiser on the GPU with BATON_CONCURRENCY=16, batching on). Two
deliberate reductions: the tokenizers are Baton's offline ones (services/devkit/tiny_tokenizers,
so the embedding tables are small), and Flux's T5 keeps T5-XXL's widths (d_model 4096, d_ff
10240, 64 heads) but only T5_LAYERS of its 24 layers, to keep the build and load inside the
budget: it runs once per window, never per step. Printed:

1. per step, service / in process: the same model, prompt, size and steps, as a Denoise call
   to the denoiser (a client's view: stream, window, latents to Redis) and as a diffusers
   pipeline call with output_type="latent" (SD 1.5 at 512 px, SDXL and Flux at 1024 px);
2. a two-stage job through the gateway (SD 1.5 model A for the first 60% of the schedule, model
   B the rest, latents handed over in Redis) / the same two windows in process;
3. batching: 16 jobs one after another, then 1/4/8/16 at once (SD 1.5 at 512 px, SDXL at 1024 px):
   images/s, speed-up, first-job latency, shared forwards (bench/batching.py's columns);
4. peak GPU memory: torch.cuda.max_memory_allocated here, per model run, and the denoiser's
   baton_gpu_memory_{allocated,reserved}_bytes gauges after loading and after the batching.

It refuses to run without CUDA; --smoke runs every step above on the CPU with tiny configs and
2 steps (CI never runs this file; `--smoke` is how to check it on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from google.protobuf import json_format
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers import logging as transformers_logging

from bench.batching import HEADER, sweep
from bench.timing import median_time
from services.client import BatonClient
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.devkit.cluster import LocalCluster
from services.devkit.tiny_tokenizers import clip_tokenizer, t5_tokenizer

PROMPT = "a photo of a mountain landscape at night"
SPLIT = 0.6
T5_LAYERS = 2  # of T5-XXL's 24 (see the docstring)
GIB = 1 << 30

# name: CLIPTextConfig fields. ViT-L/14 (SD 1.5; first encoder of SDXL and Flux) and OpenCLIP
# bigG/14 (SDXL's second); "tiny" is diffusers' test encoder.
CLIP = {
    "vit-l": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  projection_dim=768, hidden_act="quick_gelu"),
    "bigg": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 projection_dim=32, hidden_act="gelu"),
}  # fmt: skip
T5 = {
    "xxl": dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=T5_LAYERS,
                relative_attention_num_buckets=32),
    "tiny": dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8),
}  # fmt: skip
# The SD/SDXL/Flux VAEs share one layout (4 blocks, 8x); the tiny one has 2 (2x).
VAE = {
    "real": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=64),
}
SD15_UNET = {
    "real": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        sample_size=64,
    ),
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        sample_size=32,
    ),
}
SDXL_UNET = {
    "real": dict(
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_time_embed_dim=256,
        sample_size=128,
    ),
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_time_embed_dim=8,
        sample_size=32,
    ),
}
FLUX = {
    "real": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 axes_dims_rope=(16, 56, 56)),
    "tiny": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 axes_dims_rope=(4, 4, 8)),
}  # fmt: skip


@dataclass(frozen=True)
class Build:
    """Where and how the networks are made: built on `device` (a 12B-parameter init on the CPU
    takes minutes), saved in `dtype`."""

    size: str  # "real" or "tiny"
    device: str
    dtype: torch.dtype

    def make(self, seed: int, factory: Callable[[], Any]) -> Any:
        torch.manual_seed(seed)
        with torch.device(self.device):
            return factory().to(self.dtype)

    def clip(self, kind: str, seed: int, tokenizer: Any, projection: bool = False) -> Any:
        config = CLIPTextConfig(
            **CLIP[kind if self.size == "real" else "tiny"],
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        return self.make(seed, lambda: cls(config))

    def t5(self, seed: int, tokenizer: Any) -> Any:
        config = T5Config(
            **T5["xxl" if self.size == "real" else "tiny"],
            feed_forward_proj="gated-gelu",
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return self.make(seed, lambda: T5EncoderModel(config))

    def vae(self, seed: int, latent_channels: int, **config: Any) -> Any:
        shape = VAE[self.size]
        blocks = len(shape["block_out_channels"])
        return self.make(
            seed,
            lambda: AutoencoderKL(
                **shape,
                down_block_types=("DownEncoderBlock2D",) * blocks,
                up_block_types=("UpDecoderBlock2D",) * blocks,
                latent_channels=latent_channels,
                **config,
            ),
        )


def sd_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )


def build_sd15(b: Build, seed: int) -> Any:
    tokenizer = clip_tokenizer()
    text_encoder = b.clip("vit-l", seed + 1, tokenizer)
    width = text_encoder.config.hidden_size
    unet = b.make(
        seed,
        lambda: UNet2DConditionModel(**SD15_UNET[b.size], in_channels=4, out_channels=4, cross_attention_dim=width),
    )
    return StableDiffusionPipeline(
        vae=b.vae(seed + 2, 4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(b: Build, seed: int) -> Any:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text_encoder = b.clip("vit-l", seed + 1, tokenizer)
    text_encoder_2 = b.clip("bigg", seed + 2, tokenizer_2, projection=True)
    config = SDXL_UNET[b.size]
    # Six time ids (original size, crop, target size), each embedded, and the pooled text embedding.
    add_dim = 6 * config["addition_time_embed_dim"] + text_encoder_2.config.projection_dim
    cross = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    unet = b.make(
        seed,
        lambda: UNet2DConditionModel(
            **config,
            in_channels=4,
            out_channels=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=add_dim,
            cross_attention_dim=cross,
        ),
    )
    return StableDiffusionXLPipeline(
        vae=b.vae(seed + 3, 4, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sd_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_flux(b: Build, seed: int) -> Any:
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = b.clip("vit-l", seed + 1, tokenizer)
    text_encoder_2 = b.t5(seed + 2, tokenizer_2)
    transformer = b.make(
        seed,
        lambda: FluxTransformer2DModel(
            **FLUX[b.size],
            patch_size=1,
            in_channels=64,  # 2x2 patches of 16 latent channels
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=True,
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
        max_shift=1.15,
    )  # fmt: skip
    vae = b.vae(
        seed + 3, 16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[Build, int], Any]
    seed: int
    side: int  # image side in pixels on the GPU (the tiny configs run at 64)


MODELS = [
    Model("sd15-a", build_sd15, 0, 512),
    Model("sd15-b", build_sd15, 10, 512),
    Model("sdxl", build_sdxl, 20, 1024),
    Model("flux-dev", build_flux, 30, 1024),
]
STEP_MODELS = ["sd15-a", "sdxl", "flux-dev"]
BATCH_MODELS = ["sd15-a", "sdxl"]
CONCURRENCY = [1, 4, 8, 16]


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Sections:
    """Runs each part on its own: a part that fails prints why and the others still run."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        print(f"\n== {name}", flush=True)
        try:
            yield
        except Exception:
            self.failed.append(name)
            traceback.print_exc()
            print(f"== {name}: FAILED", flush=True)
        finally:
            now = time.perf_counter()
            print(f"   ({now - began:.1f}s; {now - self.start:.0f}s in all)", flush=True)


def build_all(b: Build, root: Path) -> dict[str, Path]:
    paths = {}
    for m in MODELS:
        began = time.perf_counter()
        pipe = m.build(b, m.seed)
        params = sum(p.numel() for c in pipe.components.values() if hasattr(c, "parameters") for p in c.parameters())
        built = time.perf_counter() - began
        paths[m.name] = root / m.name
        pipe.save_pretrained(paths[m.name], safe_serialization=True)
        print(f"{m.name:>9}: {params / 1e6:,.0f} M parameters, built in {built:.1f}s, "
              f"saved in {time.perf_counter() - began - built:.1f}s", flush=True)  # fmt: skip
        del pipe
        release()
    return paths


def load(path: Path, b: Build) -> Any:
    pipe = DiffusionPipeline.from_pretrained(path, dtype=b.dtype).to(b.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Peak:
    """This process's peak allocated GPU memory over a block, above what was allocated before it."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = self.peak = 0

    def __enter__(self) -> Peak:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()

    def __str__(self) -> str:
        if not self.cuda:
            return "-"
        return f"{gib(self.peak)} (+{gib(self.peak - self.base)})"


@dataclass
class StepTimes:
    """Median whole-run seconds at `steps` and at twice as many, in process and through the service."""

    steps: int
    diffusers: tuple[float, float]
    service: tuple[float, float]

    def per_step(self, run: tuple[float, float]) -> float:
        # The difference cancels what a run costs once: text encoders (which the service's prompt
        # cache skips on a repeated prompt), noise, the result's write.
        return (run[1] - run[0]) / self.steps


def per_step(stub: Any, name: str, pipe: Any, side: int, steps: int, repeat: int, peak: Peak) -> StepTimes:
    """Both ways at `steps` and 2 x `steps`; `peak` watches the in-process runs."""

    def in_process(n: int) -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        pipe(PROMPT, num_inference_steps=n, generator=generator, output_type="latent", width=side, height=side)
        sync(str(pipe.device))

    def service(n: int) -> None:
        request = dpb.DenoiseRequest(model=name, prompt=PROMPT, steps=n, seed=1, width=side, height=side)
        events = list(stub.Denoise(request, timeout=600))
        assert events[-1].HasField("result"), events[-1]

    in_process(steps), service(steps)  # warm both
    with peak:
        diffusers = tuple(median_time(lambda n=n: in_process(n), repeat) for n in (steps, 2 * steps))
    ours = tuple(median_time(lambda n=n: service(n), repeat) for n in (steps, 2 * steps))
    return StepTimes(steps, diffusers, ours)  # type: ignore[arg-type]


@torch.no_grad()
def window(pipe: Any, steps: int, start: float, end: float, latents: Any, side: int, device: str) -> Any:
    """One window of an SD schedule with diffusers' components, as a pipeline runs it."""
    cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True, None)
    embeds = torch.cat([uncond, cond])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    ts, T = scheduler.timesteps, scheduler.config.num_train_timesteps
    begin = len(ts) - int((ts < round(T - start * T)).sum()) if start else 0
    stop = int((ts >= round(T - end * T)).sum()) if end < 1 else len(ts)
    scheduler.set_begin_index(begin)
    if latents is None:
        shape = (1, 4, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
        generator = torch.Generator().manual_seed(1)
        latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
    for t in ts[begin:stop]:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        u, c = pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
        latents = scheduler.step(u + 7.5 * (c - u), t, latents, return_dict=False)[0]
    return latents


def two_stage_spec(side: int, steps: int) -> jpb.JobSpec:
    stages = [
        {"name": "a", "denoise": {"model": "sd15-a", "prompt": PROMPT, "steps": steps, "denoising_end": SPLIT}},
        {"name": "b", "denoise": {"model": "sd15-b", "prompt": PROMPT, "steps": steps, "latents": "a"}},
    ]
    job = {"name": "gpu-two-stage", "seed": 1, "width": side, "height": side, "stages": stages}
    return json_format.ParseDict(job, jpb.JobSpec())


def run_job(address: str, job: jpb.JobSpec) -> None:
    with BatonClient(address) as client:
        done = client.wait(client.submit(job).id)
        assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error


def gpu_gauges(cluster: LocalCluster) -> str:
    """The denoiser's baton_gpu_memory_*_bytes gauges (now, not peaks: reserved stays near the peak)."""
    metrics = cluster.processes("denoiser")[0].metrics()
    found = []
    for key, value in metrics.items():
        if key.startswith("baton_gpu_memory_"):
            kind = key.split("{")[0].removeprefix("baton_gpu_memory_").removesuffix("_bytes")
            found.append(f"{kind} {gib(value)} ({key.split('{')[1].rstrip('}')})")
    return ", ".join(found) or "none (no CUDA in the denoiser)"


def scratch_dir(smoke: bool) -> Path:
    """/dev/shm when it has room for the weights (writing and reading them is part of the budget)."""
    shm = Path("/dev/shm")
    if not smoke and shm.is_dir() and shutil.disk_usage(shm).free > 48 * GIB:
        return Path(tempfile.mkdtemp(prefix="baton-gpu-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="baton-gpu-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default 8; --smoke: 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per comparison (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--burst-time", type=float, default=3.0, help="repeat each batching burst until this long")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, float32, 2 steps")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # the casts of freshly built models warn, harmlessly
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "bench.gpu needs a CUDA device and torch.cuda.is_available() is False here. "
            "`python -m bench.gpu --smoke` runs the same code on the CPU with tiny configs."
        )
    b = Build("tiny", "cpu", torch.float32) if args.smoke else Build("real", "cuda", getattr(torch, args.dtype))
    steps = args.steps or (2 if args.smoke else 8)
    sides = {m.name: 64 if args.smoke else m.side for m in MODELS}
    device = torch.cuda.get_device_name() if b.device == "cuda" else "CPU (smoke: tiny configs)"
    print(f"{device}, torch {torch.__version__}, {b.dtype}, {steps} steps, median of {args.repeat}", flush=True)
    sections = Sections()
    root = scratch_dir(args.smoke)
    try:
        run(args, b, steps, sides, root, sections)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - sections.start:.0f}s", flush=True)
    if sections.failed:
        raise SystemExit(f"failed: {', '.join(sections.failed)}")


def run(args: argparse.Namespace, b: Build, steps: int, sides: dict[str, int], root: Path, sections: Sections) -> None:
    paths: dict[str, Path] = {}
    with sections.part(f"build and save ({root})"):
        paths = build_all(b, root)
    if len(paths) < len(MODELS):
        return
    env = {
        "BATON_MODELS": ",".join(f"{name}={path}" for name, path in paths.items()),
        "BATON_PRELOAD": ",".join(paths),
        "BATON_MAX_MODELS": str(len(paths)),  # all stay resident
        "BATON_DEVICE": b.device,
        "BATON_DTYPE": str(b.dtype).removeprefix("torch."),
        "BATON_CONCURRENCY": "16",
        "HF_HUB_OFFLINE": "1",
        "BATON_LOG_LEVEL": "warning",
    }
    cluster = LocalCluster(["gateway", "denoiser"], log_dir=root / "logs", env=env, default_ports=False)
    with sections.part("cluster start (the denoiser loads every model)"):
        cluster.start(timeout=600)
        print(f"denoiser GPU memory after loading: {gpu_gauges(cluster)}", flush=True)
    try:
        if cluster.processes("denoiser"):
            measure(args, b, steps, sides, paths, cluster, sections)
    finally:
        cluster.stop()
        for log in sorted((root / "logs").glob("*.log")):
            if sections.failed and log.stat().st_size:
                print(f"-- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:]), file=sys.stderr)


def measure(
    args: argparse.Namespace,
    b: Build,
    steps: int,
    sides: dict[str, int],
    paths: dict[str, Path],
    cluster: LocalCluster,
    sections: Sections,
) -> None:
    peaks: dict[str, Peak] = {}
    with sections.part("1. per step: service (Denoise call) / in-process diffusers"):
        stub = denoiser_pb2_grpc.DenoiserStub(cluster.processes("denoiser")[0].channel)
        print(f"per step = (run at {2 * steps} steps - run at {steps}) / {steps}; whole run: at {steps} steps, "
              "the service's prompt cache hit (the same prompt each time)")  # fmt: skip
        print(f"{'model':>9} {'side':>5} {'diffusers':>10} {'service':>10} {'ratio':>6} {'whole run':>20} {'ratio':>6}"
              "  in-process peak (+ over weights)")  # fmt: skip
        for name in STEP_MODELS:
            peaks[name] = Peak(b.device)
            t = per_step(stub, name, load(paths[name], b), sides[name], steps, args.repeat, peaks[name])
            base, ours = t.per_step(t.diffusers), t.per_step(t.service)
            whole = f"{t.diffusers[0]:.3f}s/{t.service[0]:.3f}s"
            print(f"{name:>9} {sides[name]:>5} {base * 1e3:>8.1f}ms {ours * 1e3:>8.1f}ms {ours / base:>6.3f} "
                  f"{whole:>20} {t.service[0] / t.diffusers[0]:>6.3f}  {peaks[name]}", flush=True)  # fmt: skip
            release()
    with sections.part(f"2. two-stage job (sd15-a to {SPLIT}, then sd15-b) through the gateway / in process"):
        peaks["two-stage"] = Peak(b.device)
        two_stage(cluster.address("gateway"), paths, sides["sd15-a"], steps, args.repeat, b, peaks["two-stage"])
        release()
    with sections.part(f"3. batching: 16 jobs one after another, then N at once ({steps} steps each)"):
        print(HEADER, flush=True)
        for name in BATCH_MODELS:
            side = sides[name]
            rows, alone = sweep(cluster, name, f"{side}px", "on", name, side, CONCURRENCY, steps, args.burst_time)
            for row in rows:
                print(row.line(), flush=True)
            print(f"{name}: one job alone {alone:.3f}s", flush=True)
    with sections.part("4. GPU memory"):
        for name, peak in peaks.items():
            print(f"in process, {name}: peak allocated {peak}")
        print(f"denoiser after the batching: {gpu_gauges(cluster)}", flush=True)


def release() -> None:
    """Hands the memory of the in-process models that went out of scope back to the GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def two_stage(address: str, paths: dict[str, Path], side: int, steps: int, repeat: int, b: Build, peak: Peak) -> None:
    a, second = load(paths["sd15-a"], b), load(paths["sd15-b"], b)

    def in_process() -> None:
        handoff = window(a, steps, 0.0, SPLIT, None, side, b.device)
        window(second, steps, SPLIT, 1.0, handoff, side, b.device)
        sync(b.device)

    job = two_stage_spec(side, steps)
    in_process(), run_job(address, job)  # warm both
    with peak:
        base = median_time(in_process, repeat)
    ours = median_time(lambda: run_job(address, job), repeat)
    print(f"{side} px, {steps} steps: in process {base:.3f}s, cluster {ours:.3f}s, ratio {ours / base:.3f}", flush=True)


if __name__ == "__main__":
    main()
