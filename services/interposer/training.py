"""Train a v4.0 interposer for a pair nobody publishes: `baton interposer train --source-vae A --target-vae B ...`.

The v4 recipe (shared/reference/latent_spaces.md): images encoded by both VAEs to raw latents, a forward net
(source -> target) and a reverse net trained together with L1 losses (forward, round trip, reverse), AdamW
lr 5e-4 betas (0.5, 0.95). The output file holds the forward net in the published layout, so the service
loads it like a published one. Checkpoints are safetensors too (no pickle), and resuming is exact: a
checkpoint records the setup it was trained with, and resuming under another one is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from services.common.errors import BatonError, FailedPrecondition, InvalidArgument, NotFound
from services.interposer.net import InterposerNet, load_state_dict_strict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BETAS = (0.5, 0.95)


@dataclass
class TrainResult:
    losses: list[float]  # one per step done in this call (after `start_step`)
    start_step: int  # where this call began: 0, or the step of the checkpoint it resumed
    steps: int  # steps done in total, counting those of a resumed checkpoint
    out: Path
    reverse: Path


def checkpoint_path(out: Path) -> Path:
    return out.with_suffix(".ckpt.safetensors")


def reverse_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.reverse.safetensors")


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL from a VAE folder or from a whole pipeline folder (its `vae` subfolder)."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    elif not (folder / "config.json").is_file():
        raise NotFound(f"{path} is neither a diffusers VAE folder nor a pipeline folder with a vae/ subfolder")
    return AutoencoderKL.from_pretrained(folder).eval()


def vae_downscale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidArgument(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}", field="images")
    return files


def load_image(path: Path, size: int) -> torch.Tensor:
    """One image resized and centre-cropped to size x size, as [3, size, size] in [-1, 1]."""
    with Image.open(path) as im:
        fitted = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def vae_fingerprint(vae) -> str:
    """Latent channels and a digest of config and weights: names the VAE itself, not the folder it came from."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}  # not _name_or_path and the like
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{vae.config.latent_channels} latent channels, sha256 {digest.hexdigest()[:16]}"


def image_set_fingerprint(files: list[Path]) -> str:
    """Count and a digest of names and sizes (cheap where contents are not): adding, removing or renaming an image,
    or rewriting it to another size, changes it."""
    digest = hashlib.sha256()
    for path in files:  # sorted: their order is the latents' order, which minibatches index
        digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
    return f"{len(files)} images, sha256 {digest.hexdigest()[:16]}"


# A run's setup: each setting a training run depends on, by its flag, as (identity, as given). Resuming needs
# every identity equal; the given form (a folder path, say) only helps a message say which run was which.
RunSetup = dict[str, tuple[str, str]]


def _checkpoint_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def _check_setup(ckpt: Path, setup: RunSetup) -> None:
    """Refuses to resume from a checkpoint trained under another setup, naming each setting that differs."""
    recorded = _checkpoint_metadata(ckpt).get("setup")
    advice = "start over with --no-resume, or pass another --out"
    if recorded is None:
        raise FailedPrecondition(f"checkpoint {ckpt} records no training setup to resume under; {advice}")
    then: RunSetup = {name: (identity, given) for name, (identity, given) in json.loads(recorded).items()}
    missing = ("(none)", "(none)")
    differing = [
        f"{name}: checkpoint {_shown(then.get(name, missing))}, now {_shown(setup.get(name, missing))}"
        for name in sorted(then.keys() | setup.keys())
        if then.get(name, missing)[0] != setup.get(name, missing)[0]
    ]
    if differing:
        raise FailedPrecondition(
            f"checkpoint {ckpt} was trained under another setup ({'; '.join(differing)}); {advice}"
        )


def _shown(setting: tuple[str, str]) -> str:
    identity, given = setting
    return identity if identity == given else f"{given} ({identity})"


@torch.no_grad()
def encode_images(vaes: list, files: list[Path], size: int, device: str, progress: bool) -> list[torch.Tensor]:
    """Raw latents (latent_dist.mode(), no scale or shift) of every image by each VAE: the interposer's space.

    Images are read a chunk at a time, so only the latents of a large folder are held in memory."""
    for vae in vaes:
        vae.to(device)
    latents: list[list[torch.Tensor]] = [[] for _ in vaes]
    for i in tqdm(range(0, len(files), 8), disable=not progress, desc="encoding", unit="chunk"):
        pixels = torch.stack([load_image(path, size) for path in files[i : i + 8]]).to(device)
        for out, vae in zip(latents, vaes, strict=True):
            out.append(vae.encode(pixels).latent_dist.mode().float())
    return [torch.cat(chunks) for chunks in latents]


def _save_checkpoint(
    path: Path, fwd: InterposerNet, rev: InterposerNet, opt, step: int, loss: float, gen, setup: RunSetup
) -> None:
    tensors = {f"fwd.{k}": v for k, v in fwd.state_dict().items()}
    tensors |= {f"rev.{k}": v for k, v in rev.state_dict().items()}
    # AdamW's per-parameter state under "optim.<param index>.<name>"; its hyper-parameters are the call's.
    for index, state in opt.state_dict()["state"].items():
        tensors |= {f"optim.{index}.{name}": torch.as_tensor(value) for name, value in state.items()}
    tensors["step"] = torch.tensor(step, dtype=torch.int64)
    tensors["rng.batches"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(fwd.parameters()).device
    if device.type == "cuda":  # dropout draws from the device's generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"loss": json.dumps(loss), "setup": json.dumps(setup)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, meta)
    tmp.replace(path)


def _load_checkpoint(path: Path, fwd: InterposerNet, rev: InterposerNet, opt, gen) -> tuple[int, float]:
    tensors = load_file(path)
    loss = json.loads(_checkpoint_metadata(path).get("loss", "NaN"))
    for prefix, net in (("fwd.", fwd), ("rev.", rev)):
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_dict_strict(net, state, f"{path} ({prefix[:-1]} net)")
    device = next(fwd.parameters()).device
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim.setdefault(int(index), {})[name] = value
    state = opt.state_dict()
    state["state"] = optim
    opt.load_state_dict(state)
    gen.set_state(tensors["rng.batches"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    # The strict loader leaves the nets in eval mode; training goes on in train mode.
    fwd.train()
    rev.train()
    return int(tensors["step"]), loss


def _minibatch(src: torch.Tensor, dst: torch.Tensor, batch: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs, each flipped left-right with probability 1/2 (the same flip on both sides)."""
    index = torch.randint(len(src), (batch,), generator=gen).to(src.device)
    flip = (torch.rand(batch, generator=gen) < 0.5).view(-1, 1, 1, 1).to(src.device)
    a, b = (torch.where(flip, t[index].flip(3), t[index]) for t in (src, dst))
    return a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)


def _trainee(src: torch.Tensor, dst: torch.Tensor, device: str) -> InterposerNet:
    """A fresh net from src's latents to dst's, its Upsample scaled by the ratio of their sizes (1 when alike)."""
    net = InterposerNet(src.shape[1], dst.shape[1], scale=dst.shape[-1] / src.shape[-1])
    # Channels-last convolutions train several times faster on CPU (oneDNN) and no slower on GPU;
    # Module.to takes memory_format at run time, its type stubs do not list it.
    return net.to(device=device, memory_format=torch.channels_last).train()  # type: ignore[call-overload]


def train(
    source_vae: str | Path,
    target_vae: str | Path,
    images: Path,
    steps: int,
    out: Path,
    *,
    batch: int = 8,
    lr: float = 5e-4,
    size: int = 256,
    checkpoint_every: int = 500,
    resume: bool = True,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Trains source -> target (and the reverse) until `steps` in total; writes `out` and its reverse."""
    if steps < 1 or batch < 1 or checkpoint_every < 1:
        raise InvalidArgument("steps, batch and checkpoint_every must be positive")
    out = Path(out)
    vaes = [load_vae(source_vae), load_vae(target_vae)]
    multiple = max(vae_downscale(v) for v in vaes)
    if size % multiple:
        raise InvalidArgument(f"size {size} must be a multiple of {multiple}, the VAEs' downscale", field="size")
    files = image_files(Path(images))
    # Checked before encoding, which is the slow part of a start: a refusal comes at once.
    setup: RunSetup = {
        "--source-vae": (vae_fingerprint(vaes[0]), str(source_vae)),
        "--target-vae": (vae_fingerprint(vaes[1]), str(target_vae)),
        "--images": (image_set_fingerprint(files), str(images)),
        "--size": (str(size), str(size)),
        "--batch": (str(batch), str(batch)),
        "--lr": (repr(float(lr)), repr(float(lr))),
        "--seed": (str(seed), str(seed)),
    }
    ckpt = checkpoint_path(out)
    resuming = resume and ckpt.is_file()
    if resuming:
        _check_setup(ckpt, setup)
    src, dst = encode_images(vaes, files, size, device, progress)
    del vaes
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fwd, rev = _trainee(src, dst, device), _trainee(dst, src, device)
        opt = torch.optim.AdamW([*fwd.parameters(), *rev.parameters()], lr=lr, betas=BETAS)
        gen = torch.Generator().manual_seed(seed)
        start, loss_value = 0, float("nan")
        if resuming:
            start, loss_value = _load_checkpoint(ckpt, fwd, rev, opt, gen)
        losses: list[float] = []
        bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc="interposer", unit="step")
        for step in range(start + 1, steps + 1):
            a, b = _minibatch(src, dst, batch, gen)
            pred = fwd(a)
            loss = F.l1_loss(pred, b) + F.l1_loss(rev(pred), a) + F.l1_loss(rev(b), a)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = loss.item()
            losses.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % checkpoint_every == 0 or step == steps:
                _save_checkpoint(ckpt, fwd, rev, opt, step, loss_value, gen, setup)
        bar.close()
    done = max(start, steps)
    meta = {
        "interposer": "v4.0",
        "steps": str(done),
        "final_loss": f"{loss_value:.6f}",
        "source_vae": str(source_vae),
        "target_vae": str(target_vae),
    }
    for net, path in ((fwd, out), (rev, reverse_path(out))):
        channels = {"ch_in": str(net.ch_in), "ch_out": str(net.ch_out), "scale": str(net.scale)}
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, path, meta | channels)
    return TrainResult(losses=losses, start_step=start, steps=done, out=out, reverse=reverse_path(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton interposer train",
        description="Train a v4.0 latent interposer between two VAEs on a folder of images.",
    )
    p.add_argument("--source-vae", required=True, help="VAE folder, or a diffusers pipeline folder (uses vae/)")
    p.add_argument("--target-vae", required=True, help="VAE folder, or a diffusers pipeline folder (uses vae/)")
    p.add_argument("--images", required=True, type=Path, help="folder of png/jpg/webp training images")
    p.add_argument("--steps", required=True, type=int, help="total optimizer steps (a resumed run counts its own)")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors (forward net, published layout)")
    p.add_argument("--batch", type=int, default=8, help="latent pairs per step (the published nets used 48-128)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--size", type=int, default=256, help="image side in pixels before encoding")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initialisation and minibatch seed")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train(
            args.source_vae,
            args.target_vae,
            args.images,
            args.steps,
            args.out,
            batch=args.batch,
            lr=args.lr,
            size=args.size,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            seed=args.seed,
            device=args.device,
        )
    except BatonError as exc:
        print(f"baton interposer train: {exc}", file=sys.stderr)
        return 2
    last = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"{result.out} (reverse: {result.reverse}) after {result.steps} steps{last}")
    return 0
