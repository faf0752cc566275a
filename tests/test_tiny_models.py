"""The devkit's tiny pipelines: real diffusers pipelines, built offline, identical in every process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.cli.main import main as baton
from services.common.errors import InvalidArgument
from services.devkit.tiny_models import FAMILIES, build
from services.devkit.tiny_tokenizers import BOS, EOS, clip_tokenizer, clip_vocab, t5_tokenizer, t5_vocab

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "A Beautiful landscape, mountains at night!", "zebra xylophone 1234 €"]
PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "kolors": "KolorsPipeline",
}
# 64 px with the tiny VAEs' factor of 2: 32x32 latents (Flux packs them into 256 tokens of 64).
LATENT_SHAPES = {
    "sd1": [1, 4, 32, 32],
    "sdxl": [1, 4, 32, 32],
    "sd3": [1, 16, 32, 32],
    "flux": [1, 256, 64],
    "kolors": [1, 4, 32, 32],
}

# Loads every family through DiffusionPipeline in a fresh process, where HF_HUB_OFFLINE is read at import.
RUN_OFFLINE = """
import json, sys
from pathlib import Path
import torch
from diffusers import DiffusionPipeline

report = {}
for folder in sorted(Path(sys.argv[1]).iterdir()):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 32} if folder.name in ("sd3", "flux") else {}
    with torch.no_grad():
        latents = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(0), **extra).images
    report[folder.name] = {
        "pipeline": type(pipe).__name__,
        "vae_scale_factor": pipe.vae_scale_factor,
        "shape": list(latents.shape),
        "finite": bool(torch.isfinite(latents).all()),
        "std": float(latents.std()),
    }
print(json.dumps(report))
"""

TOKENIZE = """
import json, sys
from services.devkit.tiny_tokenizers import clip_tokenizer, t5_tokenizer
prompts = json.loads(sys.argv[1])
print(json.dumps({
    "clip": [clip_tokenizer()(p).input_ids for p in prompts],
    "clip_padded_with_bang": clip_tokenizer("!")(prompts[0], padding="max_length").input_ids,
    "t5": [t5_tokenizer()(p).input_ids for p in prompts],
}))
"""


def _python(script: str, *args: str, **env: str) -> str:
    """Run a script in a fresh interpreter at the repository root and return its last stdout line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-models")
    for family in FAMILIES:
        build(family, root / family)
    return root


@pytest.fixture(scope="module")
def offline_runs(tiny_root) -> dict:
    return json.loads(_python(RUN_OFFLINE, str(tiny_root), HF_HUB_OFFLINE="1"))


def test_clip_vocab_ends_with_start_and_end_of_text():
    vocab, _ = clip_vocab()
    assert vocab[BOS] == len(vocab) - 2
    assert vocab[EOS] == len(vocab) - 1


def test_common_prompt_words_are_single_clip_tokens():
    tokenizer = clip_tokenizer()
    for word in ["landscape", "mountain", "cat", "photo", "portrait", "city", "night"]:
        assert len(tokenizer(word).input_ids) == 3, word  # <|startoftext|> word <|endoftext|>


def test_clip_tokenizer_pads_to_77_with_the_requested_token():
    default, bang = clip_tokenizer(), clip_tokenizer(pad_token="!")
    assert default.pad_token_id == default.eos_token_id
    assert bang.convert_ids_to_tokens(bang.pad_token_id) == "!"
    padded = bang("a cat", padding="max_length").input_ids
    assert len(padded) == 77
    assert padded[-1] == bang.pad_token_id


def test_t5_tokenizer_has_pad_eos_unk_at_0_1_2_and_ends_with_eos():
    tokenizer = t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == len(t5_vocab())
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[-1] == 1
    assert 2 not in ids


def test_tokenizers_give_the_same_ids_in_another_process():
    theirs = json.loads(_python(TOKENIZE, json.dumps(PROMPTS), PYTHONHASHSEED="12345"))
    assert theirs["clip"] == [clip_tokenizer()(p).input_ids for p in PROMPTS]
    assert theirs["clip_padded_with_bang"] == clip_tokenizer("!")(PROMPTS[0], padding="max_length").input_ids
    assert theirs["t5"] == [t5_tokenizer()(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_offline_through_diffusion_pipeline_as_its_class(family, offline_runs):
    assert offline_runs[family]["pipeline"] == PIPELINES[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_vae_downscales_by_2_not_8(family, offline_runs):
    assert offline_runs[family]["vae_scale_factor"] == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_steps_give_finite_latents_of_the_family_shape(family, offline_runs):
    run = offline_runs[family]
    assert run["shape"] == LATENT_SHAPES[family]
    assert run["finite"]
    assert run["std"] > 0


@pytest.mark.parametrize("family", ["sd3", "kolors"])
def test_build_in_another_process_is_byte_identical(tmp_path, family):
    build(family, tmp_path / "here")
    script = "import sys; from services.devkit.tiny_models import build; print(build(sys.argv[1], sys.argv[2]))"
    _python(script, family, str(tmp_path / "there"), PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    here, there = _digests(tmp_path / "here"), _digests(tmp_path / "there")
    assert any(name.endswith(".safetensors") for name in here)
    assert here == there


def test_kolors_tokenizer_pads_left_and_prefixes_chatglms_gmask_sop(tiny_root):
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_root / "kolors" / "tokenizer")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=16).input_ids
    start = ids.index(tokenizer.get_command("[gMASK]"))
    assert len(ids) == 16 and set(ids[:start]) == {tokenizer.pad_token_id}
    assert ids[start + 1] == tokenizer.get_command("sop")
    assert len(ids[start + 2 :]) == 5, "each prompt word is one sentencepiece piece"


def test_kolors_unet_projects_chatglm_states_to_its_cross_attention_width(tiny_root):
    unet = json.loads((tiny_root / "kolors" / "unet" / "config.json").read_text())
    glm = json.loads((tiny_root / "kolors" / "text_encoder" / "config.json").read_text())
    assert (unet["encoder_hid_dim_type"], unet["encoder_hid_dim"]) == ("text_proj", glm["hidden_size"])
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + glm["hidden_size"]


def test_seed_changes_the_weights(tmp_path):
    build("sd1", tmp_path / "seed0", seed=0)
    build("sd1", tmp_path / "seed1", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "seed0" / weights).read_bytes() != (tmp_path / "seed1" / weights).read_bytes()


def test_build_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    build("flux", tmp_path)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_medium_vae_downscales_by_8_with_real_latent_channels(family, tmp_path):
    config = json.loads((build(family, tmp_path, size="medium") / "vae" / "config.json").read_text())
    assert 2 ** (len(config["block_out_channels"]) - 1) == 8
    assert config["latent_channels"] == 16


def test_unknown_family_is_an_invalid_argument(tmp_path):
    with pytest.raises(InvalidArgument, match="sd1, sdxl, sd3, flux"):
        build("sd4", tmp_path)


def test_main_builds_each_family_into_its_own_folder(tmp_path, capsys):
    assert baton(["dev", "tiny-models", str(tmp_path), "--family", "flux", "--family", "sd3"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "flux"), str(tmp_path / "sd3")]
    assert (tmp_path / "flux" / "model_index.json").is_file()
