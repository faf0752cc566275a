"""The v4.0 latent interposer (city96's SD-Latent-Interposer layout), its published pairs, and strict loading.

The network works on raw VAE latents; `convert` takes model-space latents and applies the source space's
constants on the way in and the target space's on the way out (see shared/reference/latent_spaces.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.common.errors import DataLoss, InvalidArgument, NotFound
from services.common.latent_spaces import LatentSpace

VERSION = "v4.0"
# Baton space id -> published id. Stable Cascade ("ca") is published as a source but has no Baton space.
SPACE_TO_PUBLISHED = {"sd1": "v1", "sdxl": "xl", "sd3": "v3", "flux": "fx"}
PUBLISHED_CHANNELS = {"v1": 4, "xl": 4, "v3": 16, "fx": 16, "ca": 4}
# Nothing converts into Flux or Cascade: the small net cannot rebuild those latents.
PUBLISHED_PAIRS: tuple[tuple[str, str], ...] = (
    *((s, d) for s in ("v1", "xl", "v3") for d in ("v1", "xl", "v3") if s != d),
    *((s, d) for s in ("fx", "ca") for d in ("v1", "xl", "v3")),
)


def weights_filename(src_published: str, dst_published: str) -> str:
    """The published file name of a pair, e.g. `v1-to-xl_interposer-v4.0.safetensors`."""
    return f"{src_published}-to-{dst_published}_interposer-{VERSION}.safetensors"


def published_scale(src_published: str) -> float:
    """Spatial scale of the core's Upsample: Cascade's stage-A latents are twice as large as the others."""
    return 0.5 if src_published == "ca" else 1.0


def _conv(ch_in: int, ch_out: int) -> nn.Conv2d:
    return nn.Conv2d(ch_in, ch_out, kernel_size=3, padding=1)


def _long(ch_in: int, ch_mid: int) -> nn.Sequential:
    # Keys long.0/2/4: the activations and the dropout hold no parameters.
    return nn.Sequential(
        _conv(ch_in, ch_mid), nn.SiLU(), _conv(ch_mid, ch_mid), nn.SiLU(), _conv(ch_mid, ch_mid), nn.Dropout(0.1)
    )


class HeadBlock(nn.Module):
    """Widens ch_in to ch_mid: ReLU(short(x) + long(x))."""

    def __init__(self, ch_in: int, ch_mid: int):
        super().__init__()
        self.short = _conv(ch_in, ch_mid)
        self.long = _long(ch_in, ch_mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.short(x) + self.long(x))


class ResidualBlock(nn.Module):
    """ReLU(n + long(n)) with n = norm(x): the residual is taken after the BatchNorm."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(ch)
        self.long = _long(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return torch.relu(x + self.long(x))


class InterposerNet(nn.Module):
    """head -> core (Upsample, `blocks` residual blocks, BatchNorm, SiLU) -> tail, on raw latents."""

    def __init__(self, ch_in: int, ch_out: int, ch_mid: int = 64, scale: float = 1.0, blocks: int = 12):
        super().__init__()
        self.ch_in, self.ch_out, self.scale = ch_in, ch_out, scale
        self.head = HeadBlock(ch_in, ch_mid)
        self.core = nn.Sequential(
            nn.Upsample(scale_factor=scale, mode="nearest"),
            *(ResidualBlock(ch_mid) for _ in range(blocks)),
            nn.BatchNorm2d(ch_mid),
            nn.SiLU(),
        )
        self.tail = _conv(ch_mid, ch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.core(self.head(x)))

    @classmethod
    def for_pair(cls, src_published: str, dst_published: str) -> InterposerNet:
        """An untrained net shaped for a pair of published ids (published or not as a pair)."""
        for field, pid in (("src", src_published), ("dst", dst_published)):
            if pid not in PUBLISHED_CHANNELS:
                raise InvalidArgument(
                    f"unknown interposer latent id {pid!r}; known: {', '.join(PUBLISHED_CHANNELS)}", field=field
                )
        return cls(
            PUBLISHED_CHANNELS[src_published], PUBLISHED_CHANNELS[dst_published], scale=published_scale(src_published)
        )


def load_state_dict_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads `state` into `net` only if keys and shapes match exactly; names the offending keys otherwise."""
    expected = net.state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [
        f"key {k!r} has shape {list(state[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise InvalidArgument(f"{source} is not a v4.0 interposer for this pair: {shown}", field="weights")
    net.load_state_dict(state, strict=True)
    net.eval()


def load_interposer(path: Path, src: str, dst: str) -> InterposerNet:
    """The net for published ids src -> dst with the weights in `path` (safetensors), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"interposer weights {path} do not exist")
    net = InterposerNet.for_pair(src, dst)
    try:
        state = load_file(path)
    except SafetensorError as exc:
        raise DataLoss(f"{path} is not a readable safetensors file: {exc}") from exc
    load_state_dict_strict(net, state, str(path))
    return net


@torch.no_grad()
def convert(
    net: nn.Module, latents: torch.Tensor, source_space: LatentSpace, target_space: LatentSpace
) -> torch.Tensor:
    """Model-space latents of `source_space` -> model-space latents of `target_space`, in the input's dtype."""
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else latents.dtype
    device = param.device if param is not None else latents.device
    raw = source_space.to_raw(latents)
    net.eval()
    out = net(raw.to(device, dtype)).to(torch.promote_types(latents.dtype, torch.float32))
    return target_space.to_model(out).to(latents.device, latents.dtype)
