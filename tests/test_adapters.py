"""LoRAs and textual inversion per stage: equal to diffusers' own loaders, nothing leaking from
one job to the next, no base-model reload, never batched with other adapter sets, and refused at
Submit with the stage and field named when missing or made for another family.

Tolerances: in process, bit-exact (torch.equal) against diffusers' pipeline after
load_lora_weights(..., adapter_name=...) and set_adapters([...], [scales]) for the same seed;
through the cluster (another process, the same CPU kernels) within 1e-5.

The LoRAs change the denoising network only: transformers 5.24 loads text-encoder LoRA layers
only with peft >= 0.22, which PyPI does not have yet, so diffusers cannot load such a file here
either (a worker refuses one at Submit, saying so: adapter_files.check_lora_loadable).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import DiffusionPipeline
from google.protobuf import json_format
from safetensors.torch import save_file

from services.client import error_info, field_violations
from services.common.api.baton.v1 import adapters_pb2 as apb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.denoiser import metrics
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from services.devkit.tiny_adapters import make_embedding, make_lora
from tests.denoise_kit import diffusers_latents, generator, request
from tests.gateway_kit import wait_for_job

STEPS = 3
SIDES = {"sd1": 64, "sdxl": 64, "flux": 128}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def family_models(root, models, flow_models) -> dict[str, str]:
    return {"sd1": models["sd1"], "sdxl": models["sdxl"], "flux": flow_models["flux"]}


@pytest.fixture(scope="module")
def loras(root, family_models) -> dict[str, tuple[str, str]]:
    """Two LoRAs per family, as files (one a folder holding its only .safetensors file)."""
    out = {}
    for family, path in family_models.items():
        first = make_lora(path, root / f"{family}-lora-a", seed=1, text_encoders=False)
        second = make_lora(path, root / f"{family}-lora-b", seed=2, text_encoders=False)
        out[family] = (str(first), str(second.parent))
    return out


@pytest.fixture(scope="module")
def engine(single_store) -> DenoiseEngine:
    return DenoiseEngine(single_store, ModelCache(load_model, defaults=LoadOptions(), max_models=6), batch_wait_s=0.5)


def run(engine: DenoiseEngine, model: str, side: int, **fields) -> torch.Tensor:
    req = request(model, steps=STEPS, width=side, height=side, **fields)
    return engine.store.get_tensor(engine.denoise(req).blob)


def reference(pipe, side: int) -> torch.Tensor:
    """diffusers' latents for `run`'s request, as [B, C, H, W] (Flux hands them back packed)."""
    latents = diffusers_latents(pipe, STEPS, width=side, height=side)
    if latents.dim() == 3:
        return pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor)
    return latents


def counter(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_loras_at_their_scales_equal_diffusers_set_adapters_and_leave_nothing_behind(
    engine, family_models, loras, family
):
    model, side = family_models[family], SIDES[family]
    first, second = loras[family]
    one = [apb.Lora(source=first, scale=0.7)]
    two = [*one, apb.Lora(source=second, scale=-0.4)]
    engine.cache.load(model)
    model_loads = counter(metrics.LOADS, model)
    adapter_loads = counter(metrics.ADAPTER_LOADS, "lora")

    bare = run(engine, model, side)
    with_one = run(engine, model, side, loras=one)
    with_two = run(engine, model, side, loras=two)
    bare_after = run(engine, model, side)
    with_one_again = run(engine, model, side, loras=one)

    pipe = DiffusionPipeline.from_pretrained(model)
    assert torch.equal(bare, reference(pipe, side))
    pipe.load_lora_weights(first, adapter_name="first")
    pipe.set_adapters(["first"], [0.7])
    reference_one = reference(pipe, side)
    pipe.load_lora_weights(second, adapter_name="second")
    pipe.set_adapters(["first", "second"], [0.7, -0.4])
    reference_two = reference(pipe, side)

    assert (with_one - bare).abs().max() > 1e-2, "the LoRA changed nothing"
    assert torch.equal(with_one, reference_one)
    assert torch.equal(with_two, reference_two)
    assert torch.equal(bare_after, bare), "the next job without the LoRA differs from the bare model"
    assert torch.equal(with_one_again, with_one)
    assert counter(metrics.LOADS, model) == model_loads, "the base model was loaded again"
    assert counter(metrics.ADAPTER_LOADS, "lora") - adapter_loads == 2, "each LoRA loads once per model"


def test_windows_with_different_loras_never_share_a_forward(engine, family_models, loras):
    model, side = family_models["sd1"], SIDES["sd1"]
    sets = [[apb.Lora(source=loras["sd1"][0], scale=0.5)], [], [apb.Lora(source=loras["sd1"][0], scale=0.9)]]
    alone = [run(engine, model, side, loras=s) for s in sets]
    batcher = engine.batcher(engine.cache.load(model))
    forwards, calls = batcher.forwards, batcher.calls
    start = threading.Barrier(len(sets))

    def together(adapters) -> torch.Tensor:
        start.wait()
        return run(engine, model, side, loras=adapters)

    with ThreadPoolExecutor(len(sets)) as pool:
        results = list(pool.map(together, sets))
    assert batcher.calls - calls == batcher.forwards - forwards, "windows with different LoRAs shared a forward"
    for i, (a, b) in enumerate(zip(alone, results, strict=True)):
        assert torch.equal(a, b), f"window {i} differs from its run alone"


def test_a_textual_inversion_token_equals_diffusers_load_textual_inversion_and_is_unloaded(engine, root, family_models):
    model, side = family_models["sd1"], SIDES["sd1"]
    embedding = make_embedding(model, root / "embeddings" / "toy.safetensors", "<toy>", vectors=2, seed=3)
    prompt = "a photo of a <toy> on a table"
    inversions = [apb.TextualInversion(source=str(embedding))]
    with_token = run(engine, model, side, prompt=prompt, textual_inversions=inversions)
    without = run(engine, model, side, prompt=prompt)

    pipe = DiffusionPipeline.from_pretrained(model)
    words = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(embedding))
    expected = pipe(prompt, negative_prompt="blurry", num_inference_steps=STEPS, generator=generator(),
                    width=side, height=side, output_type="latent").images  # fmt: skip

    assert (with_token - without).abs().max() > 1e-3, "the embedding changed nothing"
    assert torch.equal(with_token, expected)
    tokenizer = engine.cache.load(model).pipe.tokenizer
    assert len(tokenizer) == words and "<toy>" not in tokenizer.get_vocab(), "the token stayed in the tokenizer"
    assert torch.equal(run(engine, model, side, prompt=prompt), without)


# -- at Submit, through a cluster --------------------------------------------------------------
def job(lora: dict | None = None, inversion: dict | None = None, model: str = "sd1-a") -> jpb.JobSpec:
    denoise: dict = {"model": model, "prompt": "a cat", "steps": 2}
    if lora is not None:
        denoise["loras"] = [lora]
    if inversion is not None:
        denoise["textual_inversions"] = [inversion]
    stages = [{"name": "styled", "denoise": denoise}]
    return json_format.ParseDict({"name": "adapters", "seed": 5, "stages": stages}, jpb.JobSpec())


def refused(cluster, spec: jpb.JobSpec) -> grpc.RpcError:
    with cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.submit(spec)
    return info.value


def test_a_lora_for_another_family_or_a_missing_file_is_refused_at_submit_naming_the_field(
    checked_cluster, root, family_models, loras
):
    flux_lora = loras["flux"][0]
    error = refused(checked_cluster, job({"source": flux_lora}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "does not fit" in error.details() and "Flux" in error.details()
    [violation] = field_violations(error)
    assert violation.field == "stages[styled].denoise.loras[0].source"

    error = refused(checked_cluster, job({"source": str(root / "nowhere.safetensors")}))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert dict(error_info(error).metadata) == {"stage": "styled", "field": "denoise.loras[0].source"}

    pickled = root / "pickled" / "lora.bin"
    pickled.parent.mkdir(exist_ok=True)
    pickled.write_bytes(b"not even a pickle")
    error = refused(checked_cluster, job({"source": str(pickled)}))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "pickle" in error.details()

    error = refused(checked_cluster, job({"source": loras["sd1"][0], "scale": 1e6}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(error)] == ["stages[styled].denoise.loras[0].scale"]

    wide = root / "embeddings" / "wide.safetensors"
    wide.parent.mkdir(exist_ok=True)
    save_file({"<wide>": torch.ones(1, 77)}, str(wide))  # the tiny sd1 text encoder is 32 wide
    error = refused(checked_cluster, job(inversion={"source": str(wide)}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "77 wide" in error.details()
    assert [v.field for v in field_violations(error)] == ["stages[styled].denoise.textual_inversions[0].source"]


def test_a_stage_with_a_lora_through_the_cluster_equals_diffusers(checked_cluster, root):
    model = checked_cluster.models["sd1-a"]
    lora = make_lora(model, root / "cluster-lora", seed=4, text_encoders=False)
    spec = job({"source": str(lora), "scale": 0.8})
    spec.stages[0].denoise.width = spec.stages[0].denoise.height = 64
    with checked_cluster.client() as client:
        done = wait_for_job(client, client.submit(spec).id)
        assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
        latents = client.get_tensor(done.stages[0].latents.blob)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    expected = pipe("a cat", num_inference_steps=2, generator=generator(5), width=64, height=64,
                    output_type="latent").images  # fmt: skip
    assert (latents - expected).abs().max().item() <= 1e-5
