"""Checkpoints inside a denoise window (in process, real Redis, tiny models): a window stopped
part-way resumes at its last checkpoint on the next attempt, with the bits of an uninterrupted run.

Tolerance: bit-exact (torch.equal), every run in this process.
"""

from __future__ import annotations

import pytest
import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.errors import Cancelled, Draining
from services.denoiser.cache import ModelCache
from services.denoiser.checkpoints import blob_name
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from tests.denoise_kit import png, request, sample_image, sample_mask

STEPS = 10
EVERY = 2


@pytest.fixture(scope="module")
def store(single_store):
    return single_store


@pytest.fixture(scope="module")
def cache():
    return ModelCache(load_model, defaults=LoadOptions(), max_models=6)


@pytest.fixture(scope="module")
def engine(store, cache):
    return DenoiseEngine(store, cache, checkpoint_every=EVERY)


class Attempt:
    """One call of the engine: its step events, where it resumed, how it ended."""

    def __init__(self, engine: DenoiseEngine, req: dpb.DenoiseRequest, *, stop_after: int = 0, hand_off_after: int = 0):
        self.steps: list[dpb.StepEvent] = []
        self.resumed_from = 0
        self.handle = None
        self.error: Exception | None = None

        def resumed(step: int) -> None:
            self.resumed_from = step

        try:
            self.handle = engine.denoise(
                req,
                on_step=self.steps.append,
                cancelled=lambda: bool(stop_after) and len(self.steps) >= stop_after,
                handoff=lambda: bool(hand_off_after) and len(self.steps) >= hand_off_after,
                on_resume=resumed,
            )
        except (Cancelled, Draining) as exc:
            self.error = exc
        if req.output_key:  # the background write of the last checkpoint lands before the next attempt
            engine.writer.settle(blob_name(req.output_key), drop=False)

    @property
    def checkpointed(self) -> list[int]:
        return [s.step for s in self.steps if s.checkpoint]


def latents_of(store, attempt: Attempt) -> torch.Tensor:
    assert attempt.handle is not None, attempt.error
    return store.get_tensor(attempt.handle.blob)


def uninterrupted(engine, store, req: dpb.DenoiseRequest) -> torch.Tensor:
    plain = dpb.DenoiseRequest()
    plain.CopyFrom(req)
    plain.ClearField("output_key")  # no checkpoints to find or write
    return latents_of(store, Attempt(engine, plain))


CASES = {
    "sd1-euler": ("sd1", {"scheduler": "EulerDiscreteScheduler"}),
    "sd1-dpm": ("sd1", {"scheduler": "DPMSolverMultistepScheduler"}),
    "sd1-unipc": ("sd1", {"scheduler": "UniPCMultistepScheduler"}),
    "sd1-ddim": ("sd1", {"scheduler": "DDIMScheduler"}),
    "sdxl-dpm": ("sdxl", {"scheduler": "DPMSolverMultistepScheduler"}),
    "flux": ("flux", {"width": 64, "height": 64}),
}


def model_path(models, flow_models, family: str) -> str:
    return flow_models[family] if family in ("sd3", "flux") else models[family]


@pytest.mark.parametrize("case", list(CASES))
def test_a_stopped_window_resumes_at_its_last_checkpoint_with_the_same_bits(models, flow_models, engine, store, case):
    family, fields = CASES[case]
    req = request(model_path(models, flow_models, family), steps=STEPS, output_key=f"ckpt/{case}", **fields)
    stopped = Attempt(engine, req, stop_after=5)
    assert isinstance(stopped.error, Cancelled)
    assert stopped.checkpointed == [2, 4]
    resumed = Attempt(engine, req)
    assert resumed.resumed_from == 4
    assert [s.step for s in resumed.steps] == list(range(5, STEPS + 1))
    assert all(s.total == STEPS for s in resumed.steps)
    assert torch.equal(latents_of(store, resumed), uninterrupted(engine, store, req))


def test_img2img_and_inpainting_resume_on_their_own_schedules(models, engine, store):
    image = store.put_bytes(png(sample_image()), media_type="image/png")
    mask = store.put_bytes(png(sample_mask()), media_type="image/png")
    for key, fields in (
        ("ckpt/img2img", {"image": image, "strength": 0.8}),
        ("ckpt/inpaint", {"image": image, "mask": mask, "strength": 0.9}),
    ):
        req = request(models["sd1"], steps=STEPS, output_key=key, scheduler="DPMSolverMultistepScheduler", **fields)
        Attempt(engine, req, stop_after=5)
        resumed = Attempt(engine, req)
        assert resumed.resumed_from == 4, key
        assert torch.equal(latents_of(store, resumed), uninterrupted(engine, store, req)), key


def test_a_continued_window_with_carried_state_resumes_exactly(models, engine, store):
    first = Attempt(engine, request(models["sd1"], steps=16, scheduler="DPMSolverMultistepScheduler",
                                    denoising_end=0.4))  # fmt: skip
    req = request(models["sd1"], steps=16, latents=first.handle, output_key="ckpt/continued")
    stopped = Attempt(engine, req, stop_after=3)
    assert stopped.checkpointed == [2]
    resumed = Attempt(engine, req)
    assert resumed.resumed_from == 2 and resumed.steps[0].step == 3
    assert torch.equal(latents_of(store, resumed), uninterrupted(engine, store, req))


def test_second_order_schedulers_checkpoint_only_between_whole_steps(models, store, cache):
    engine = DenoiseEngine(store, cache, checkpoint_every=3)
    req = request(models["sd1"], steps=6, scheduler="HeunDiscreteScheduler", output_key="ckpt/heun")
    stopped = Attempt(engine, req, stop_after=7)
    # Heun lists every timestep but the first twice: a whole step ends after an even count of calls.
    assert stopped.checkpointed == [4]
    resumed = Attempt(engine, req)
    assert resumed.resumed_from == 4
    assert torch.equal(latents_of(store, resumed), uninterrupted(engine, store, req))


def test_a_changed_request_does_not_resume(models, engine, store):
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/changed")
    Attempt(engine, req, stop_after=5)
    other = request(models["sd1"], steps=STEPS, output_key="ckpt/changed", seed=43)
    again = Attempt(engine, other)
    assert again.resumed_from == 0 and again.steps[0].step == 1
    assert torch.equal(latents_of(store, again), uninterrupted(engine, store, other))


def test_previews_do_not_keep_a_request_from_resuming(models, engine, store):
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/labels")
    Attempt(engine, req, stop_after=3)
    relabelled = request(models["sd1"], steps=STEPS, output_key="ckpt/labels", preview_every=1)
    assert Attempt(engine, relabelled).resumed_from == 2


def test_an_unseeded_request_resumes_with_the_seed_its_first_attempt_drew(models, engine, store):
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/unseeded")
    req.ClearField("seed")
    Attempt(engine, req, stop_after=3)
    resumed = Attempt(engine, req)
    assert resumed.resumed_from == 2
    assert resumed.handle is not None
    seeded = request(models["sd1"], steps=STEPS, seed=resumed.handle.seed)
    assert torch.equal(latents_of(store, resumed), uninterrupted(engine, store, seeded))


def test_a_finished_window_removes_its_checkpoint(models, engine, store):
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/finished")
    Attempt(engine, req, stop_after=3)
    assert store.exists(blob_name("ckpt/finished"))
    Attempt(engine, req)
    assert not store.exists(blob_name("ckpt/finished"))


def test_an_ancestral_scheduler_writes_no_checkpoint_and_restarts(models, engine, store):
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/ancestral", scheduler="EulerAncestralDiscreteScheduler")
    stopped = Attempt(engine, req, stop_after=5)
    assert stopped.checkpointed == [] and not store.exists(blob_name("ckpt/ancestral"))
    again = Attempt(engine, req)
    assert again.resumed_from == 0 and again.steps[0].step == 1
    assert torch.equal(latents_of(store, again), uninterrupted(engine, store, req))


def test_checkpoint_every_0_writes_none(models, store, cache):
    engine = DenoiseEngine(store, cache, checkpoint_every=0)
    stopped = Attempt(engine, request(models["sd1"], steps=STEPS, output_key="ckpt/off"), stop_after=5)
    assert stopped.checkpointed == [] and not store.exists(blob_name("ckpt/off"))


def test_a_hand_off_checkpoints_the_latest_step_and_the_next_attempt_resumes_there(models, store, cache):
    engine = DenoiseEngine(store, cache, checkpoint_every=0)  # only the hand-off writes one
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/handoff", scheduler="DPMSolverMultistepScheduler")
    stopped = Attempt(engine, req, hand_off_after=3)
    assert isinstance(stopped.error, Draining)
    assert "checkpointed after step 3 of 10" in str(stopped.error)
    resumed = Attempt(engine, req)
    assert resumed.resumed_from == 3 and resumed.steps[0].step == 4
    assert torch.equal(latents_of(store, resumed), uninterrupted(engine, store, req))


def test_a_hand_off_without_an_output_key_says_the_window_restarts(models, engine):
    stopped = Attempt(engine, request(models["sd1"], steps=STEPS), hand_off_after=3)
    assert isinstance(stopped.error, Draining) and "restarts from its first step" in str(stopped.error)


def test_a_corrupt_checkpoint_is_ignored_and_the_window_runs_from_its_start(models, engine, store):
    req = request(models["sd1"], steps=STEPS, output_key="ckpt/corrupt")
    store.put_bytes(b"not a checkpoint", name=blob_name("ckpt/corrupt"))
    again = Attempt(engine, req)
    assert again.resumed_from == 0 and again.steps[0].step == 1
    assert not store.exists(blob_name("ckpt/corrupt"))
