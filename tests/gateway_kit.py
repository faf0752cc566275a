"""A small Baton cluster of real processes for gateway tests, plus the reference computations."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import torch

from services.client import BatonClient
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.tls import PLAINTEXT, ClientTLS
from services.devkit.cluster import LocalCluster, ServiceProcess
from services.devkit.tiny_models import build
from tests.service_procs import REPO, TEST_ENV

TERMINAL = (jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED)


def demo_models(root: Path) -> dict[str, str]:
    """The example specs' model names, mapped to tiny random models (two of each family)."""
    return {
        "sd1-a": str(build("sd1", root / "a" / "sd1", seed=0)),
        "sd1-b": str(build("sd1", root / "b" / "sd1", seed=1)),
        "sdxl-base": str(build("sdxl", root / "a" / "sdxl", seed=0)),
        "sdxl-second": str(build("sdxl", root / "b" / "sdxl", seed=1)),
    }


def aliases(models: dict[str, str]) -> str:
    return ",".join(f"{name}={path}" for name, path in models.items())


class Cluster:
    """Redis, gateways, N denoisers and, when given their env, an interposer and a processor, each a
    real process (LocalCluster) that a test can kill, pause or restart; `redis_persistence="aof"`
    keeps what Redis acknowledged across `cluster.redis.kill()` and `.restart()`."""

    def __init__(self, root: Path, models: dict[str, str], denoisers: int = 1, gateway_env: dict | None = None,
                 interposer_env: dict | None = None, processor_env: dict | None = None, *, gateways: int = 1,
                 denoiser_env: dict | None = None, redis_persistence: str = "none",
                 probe_tls: ClientTLS = PLAINTEXT):  # fmt: skip
        self.root = root
        self.models = models
        optional = {
            k: env for k, env in (("interposer", interposer_env), ("processor", processor_env)) if env is not None
        }
        service_env = {
            "gateway": {"BATON_JOB_LEASE": "2", **(gateway_env or {})},
            "denoiser": {
                "BATON_MODELS": aliases(models),
                # Tests also name models by folder (a pickled checkpoint) and by hub id (one not there).
                "BATON_MODEL_SOURCES": "/,hub:*",
                "BATON_REGISTRY_TTL": "3",
                # Several denoisers on a 2-core machine: one torch thread each, or their OpenMP
                # teams spin against each other (10x slower windows).
                **({"BATON_TORCH_THREADS": "1"} if denoisers > 1 else {}),
                **(denoiser_env or {}),
            },
            **optional,
        }
        self.local = LocalCluster(
            ["gateway", "denoiser", *optional],
            log_dir=root / "logs",
            env=TEST_ENV,
            service_env=service_env,
            default_ports=False,
            replicas={"gateway": gateways, "denoiser": denoisers},
            redis_persistence=redis_persistence,
            cwd=REPO,  # for tests.plugin_processor
            probe_tls=probe_tls,
        ).start()
        self.redis = self.local.redis
        self.redis_url = self.local.redis_url or ""
        self.gateway = self.gateways[0]  # the one client() talks to; a test may replace it
        self.interposer = next(iter(self.local.processes("interposer")), None)
        self.processor = next(iter(self.local.processes("processor")), None)

    @property
    def gateways(self) -> list[ServiceProcess]:
        return self.local.processes("gateway")

    @property
    def denoisers(self) -> list[ServiceProcess]:
        return self.local.processes("denoiser")

    @property
    def workers(self) -> list[ServiceProcess]:
        return [*self.denoisers, *(p for p in (self.interposer, self.processor) if p is not None)]

    def add_denoiser(self) -> ServiceProcess:
        """One more denoiser with the cluster's models, SERVING (and in `denoisers`)."""
        return self.local.add("denoiser")

    def start_gateway(self) -> ServiceProcess:
        """One more gateway, SERVING (and in `gateways`); `gateway` stays as it was."""
        return self.local.add("gateway")

    def client(self) -> BatonClient:
        return BatonClient(self.gateway.address)

    def stop(self) -> None:
        self.local.stop()


def wait_for_job(client: BatonClient, job_id: str, timeout: float = 120) -> jpb.Job:
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = client.get(job_id)
            if job.state in TERMINAL:
                return job
        except grpc.RpcError:
            pass  # a gateway being restarted
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(0.2)


def wait_for_progress(client: BatonClient, job_id: str, steps: int = 1) -> list[jpb.JobEvent]:
    """Events up to the `steps`-th step event of the job."""
    seen, count = [], 0
    for event in client.watch(job_id):
        seen.append(event)
        if event.WhichOneof("event") == "progress":
            count += 1
            if count >= steps:
                return seen
    raise AssertionError(f"job {job_id} ended before {steps} steps: {seen[-1]}")


@torch.no_grad()
def sd1_window_reference(path: str, prompt: str, negative: str, steps: int, guidance: float, seed: int,
                         start: float, end: float, latents: torch.Tensor | None,
                         batch: int = 1) -> torch.Tensor:  # fmt: skip
    """One window of an SD 1.x schedule by hand from diffusers' components (reference/hand_loop.md),
    written here independently of Baton's engine."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    pipe = StableDiffusionPipeline.from_pretrained(path)
    cond, uncond = pipe.encode_prompt(prompt, "cpu", batch, True, negative)
    embeds = torch.cat([uncond, cond])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    ts, T = scheduler.timesteps, scheduler.config.num_train_timesteps
    begin = len(ts) - int((ts < round(T - start * T)).sum()) if start > 0 else 0
    stop = int((ts >= round(T - end * T)).sum()) if end < 1 else len(ts)
    scheduler.set_begin_index(begin)
    if latents is None:
        vsf = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        side = pipe.unet.config.sample_size
        shape = (batch, pipe.unet.config.in_channels, side, side)
        assert side * vsf == 64
        latents = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed)) * scheduler.init_noise_sigma
    for t in ts[begin:stop]:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        u, c = pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0].chunk(2)
        latents = scheduler.step(u + guidance * (c - u), t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def flux_window_reference(path: str, prompt: str, steps: int, guidance: float, seed: int, side: int,
                          start: float, end: float, latents: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """One window of a Flux schedule by hand from diffusers' components (reference/hand_loop.md),
    independent of Baton's engine; latents in and out as [B, 16, H, W]."""
    import numpy as np
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = FluxPipeline.from_pretrained(path)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device="cpu", max_sequence_length=512)
    vsf = pipe.vae_scale_factor
    h = w = 2 * (side // (vsf * 2))
    if latents is None:
        packed, image_ids = pipe.prepare_latents(1, 16, side, side, embeds.dtype, "cpu",
                                                 torch.Generator("cpu").manual_seed(seed))  # fmt: skip
    else:
        packed = pipe._pack_latents(latents, 1, 16, h, w)
        image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", embeds.dtype)
    config = pipe.scheduler.config
    mu = calculate_shift((h // 2) * (w // 2), config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)  # fmt: skip
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ts, T = scheduler.timesteps, config.num_train_timesteps
    begin = len(ts) - int((ts < round(T - start * T)).sum()) if start > 0 else 0
    stop = int((ts >= round(T - end * T)).sum()) if end < 1 else len(ts)
    scheduler.set_begin_index(begin)
    g = torch.full([1], guidance)
    for t in ts[begin:stop]:
        inputs = {"pooled_projections": pooled, "encoder_hidden_states": embeds, "txt_ids": text_ids}
        v = pipe.transformer(hidden_states=packed, timestep=t.expand(1) / 1000, guidance=g, img_ids=image_ids,
                             return_dict=False, **inputs)[0]  # fmt: skip
        packed = scheduler.step(v, t, packed, return_dict=False)[0]
    return pipe._unpack_latents(packed, side, side, vsf)
