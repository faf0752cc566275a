"""Training an interposer between the VAEs of two tiny pipelines: loss, output layout, exact resume, resume
refused under another setup, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from services.common.errors import FailedPrecondition
from services.devkit.tiny_models import build
from services.interposer.net import load_interposer
from services.interposer.training import checkpoint_path, main, train

# Tiny VAEs downscale by 2: 16 px images give 8x8 latents, small enough for CPU training in seconds.
SIZE = 16
BATCH = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interposer-train")
    images = root / "images"
    images.mkdir()
    y, x = np.mgrid[0:64, 0:64]
    for i in range(8):
        rgb = np.stack([(x * 4 + 20 * i) % 256, (y * 4) % 256, ((x + y) * 2 + 30 * i) % 256], -1).astype(np.uint8)
        rgb[10 + 3 * i : 30 + 3 * i, 20:40] = (255 - 20 * i, 40, 200)  # a box that moves from image to image
        Image.fromarray(rgb).save(images / f"{i}.png")
    return {
        "sd1": build("sd1", root / "sd1"),
        "sdxl_vae": build("sdxl", root / "sdxl") / "vae",
        "images": images,
        "root": root,
    }


@pytest.fixture(scope="module")
def trained(setup):
    out = setup["root"] / "sd1-to-sdxl.safetensors"
    return train(setup["sd1"], setup["sdxl_vae"], setup["images"], 50, out, batch=BATCH, size=SIZE, progress=False)


def test_loss_falls(trained):
    assert len(trained.losses) == 50 and trained.steps == 50
    assert np.mean(trained.losses[-10:]) < np.mean(trained.losses[:10])


def test_output_loads_like_a_published_file(trained):
    net = load_interposer(trained.out, "v1", "xl")
    with torch.no_grad():
        assert net(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8, 8)
    load_interposer(trained.reverse, "xl", "v1")
    with safe_open(trained.out, "pt") as f:
        meta = f.metadata()
    assert meta["ch_in"] == "4" and meta["ch_out"] == "4" and meta["steps"] == "50"
    assert float(meta["final_loss"]) == pytest.approx(trained.losses[-1], abs=1e-5)


def test_resume_continues_from_the_checkpoint_exactly(setup, trained):
    out = setup["root"] / "resumed.safetensors"
    common = dict(batch=BATCH, size=SIZE, checkpoint_every=10, progress=False)
    first = train(setup["sd1"], setup["sdxl_vae"], setup["images"], 30, out, **common)
    assert checkpoint_path(out).is_file()
    second = train(setup["sd1"], setup["sdxl_vae"], setup["images"], 50, out, resume=True, **common)
    assert (second.start_step, second.steps, len(second.losses)) == (30, 50, 20)
    # The same seed uninterrupted: nets, optimizer and both random streams come back from the checkpoint.
    torch.testing.assert_close(first.losses + second.losses, trained.losses, atol=1e-5, rtol=1e-5)


def test_resume_accepts_the_same_vae_by_another_path(setup):
    out = setup["root"] / "same-vae.safetensors"
    common = dict(batch=BATCH, size=SIZE, checkpoint_every=2, progress=False)
    train(setup["sd1"], setup["sdxl_vae"], setup["images"], 2, out, **common)
    # The pipeline folder and its vae/ subfolder are one VAE: the checkpoint knows it by content, not by path.
    again = train(setup["sd1"] / "vae", setup["sdxl_vae"], setup["images"], 4, out, **common)
    assert (again.start_step, again.steps) == (2, 4)


def test_resume_refuses_a_checkpoint_of_another_target_vae_and_lr(setup):
    out = setup["root"] / "other-setup.safetensors"
    common = dict(batch=BATCH, size=SIZE, checkpoint_every=2, progress=False)
    train(setup["sd1"], setup["sdxl_vae"], setup["images"], 2, out, **common)
    with pytest.raises(FailedPrecondition) as refused:
        train(setup["sd1"], setup["sd1"], setup["images"], 4, out, lr=1e-3, **common)
    message = str(refused.value)
    assert f"--target-vae: checkpoint {setup['sdxl_vae']} (" in message and f"now {setup['sd1']} (" in message
    assert "--lr: checkpoint 0.0005, now 0.001" in message
    assert "--images" not in message and "--source-vae" not in message and "--no-resume" in message


def test_cli_refuses_to_resume_with_other_images_until_told_not_to(setup, capsys):
    other = setup["root"] / "fewer-images"
    other.mkdir()
    for path in sorted(setup["images"].iterdir())[:5]:
        (other / path.name).write_bytes(path.read_bytes())
    out = setup["root"] / "other-images.safetensors"
    argv = ["--source-vae", str(setup["sd1"]), "--target-vae", str(setup["sdxl_vae"]), "--out", str(out)]
    argv += ["--batch", "2", "--size", str(SIZE), "--checkpoint-every", "1"]
    assert main([*argv, "--images", str(setup["images"]), "--steps", "1"]) == 0
    capsys.readouterr()

    assert main([*argv, "--images", str(other), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--images: checkpoint {setup['images']} (8 images, sha256 " in err
    assert f"now {other} (5 images, sha256 " in err and "--no-resume" in err

    assert main([*argv, "--images", str(other), "--steps", "2", "--no-resume"]) == 0
    assert "after 2 steps" in capsys.readouterr().out
    # The fresh run's checkpoint is the new folder's: resuming it goes on without --no-resume.
    assert main([*argv, "--images", str(other), "--steps", "3"]) == 0


def test_cli_trains_end_to_end(setup, capsys):
    out = setup["root"] / "cli.safetensors"
    argv = [
        "--source-vae", str(setup["sd1"]),
        "--target-vae", str(setup["sdxl_vae"]),
        "--images", str(setup["images"]),
        "--steps", "2",
        "--out", str(out),
        "--batch", "2",
        "--size", str(SIZE),
        "--checkpoint-every", "1",
        "--no-resume",
    ]  # fmt: skip
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    load_interposer(out, "v1", "xl")


def test_cli_refuses_a_size_the_vaes_cannot_encode(setup, capsys):
    argv = ["--source-vae", str(setup["sd1"]), "--target-vae", str(setup["sdxl_vae"]), "--images"]
    argv += [str(setup["images"]), "--steps", "1", "--out", str(setup["root"] / "x.safetensors"), "--size", "15"]
    assert main(argv) == 2
    assert "size 15" in capsys.readouterr().err
