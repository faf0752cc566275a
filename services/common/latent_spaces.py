"""Latent spaces: channels, raw <-> model-space scaling, and a cheap latent-to-RGB preview.

Constants from ../shared/reference/latent_spaces.md (ComfyUI's latent_formats, diffusers'
VAE configs). A loaded VAE's own config wins where it states a value (see `from_vae_config`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

Matrix = tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class LatentSpace:
    id: str
    family: str
    channels: int
    scale: float = 1.0
    shift: float = 0.0
    # Per-channel statistics: model = (raw - mean) * scale / std.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    rgb_factors: Matrix = ()
    rgb_bias: tuple[float, float, float] | None = None
    # flux2's VAE latents travel in 2x2 patches (32 channels -> 128).
    patch: int = 1
    # Normalisation by the VAE's BatchNorm running stats (flux2); eps added to the variance.
    batchnorm_eps: float | None = None
    # Its models are flow-matching (SD3, Flux): a schedule's sigma is its timestep / T.
    flow: bool = False

    def _check(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise InvalidArgument(f"{self.id} latents are [B, {self.channels}, H, W], got {list(latents.shape)}")

    def _stats(
        self, stats: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (mean, std) as broadcastable tensors, or None for plain scale/shift."""
        if self.batchnorm_eps is not None:
            if stats is None:
                raise FailedPrecondition(
                    f"{self.id} latents are normalised with the VAE's BatchNorm running stats; "
                    "pass (running_mean, running_var) from the VAE"
                )
            mean, var = stats
            std = torch.sqrt(var.to(dtype) + self.batchnorm_eps)
            return mean.to(dtype).view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        if self.mean is None or self.std is None:
            return None
        return (
            torch.tensor(self.mean, dtype=dtype).view(1, -1, 1, 1),
            torch.tensor(self.std, dtype=dtype).view(1, -1, 1, 1),
        )

    def to_model(self, raw: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Raw VAE latents -> model-space latents (what a denoiser works on)."""
        if self.patch > 1:
            raw = patchify(raw, self.patch)
        self._check(raw)
        x = raw.to(_compute_dtype(raw))
        ms = self._stats(stats, x.dtype)
        out = (x - ms[0]) * self.scale / ms[1] if ms else (x - self.shift) * self.scale
        return out.to(raw.dtype)

    def to_raw(self, latents: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Model-space latents -> raw VAE latents (what vae.decode takes)."""
        self._check(latents)
        x = latents.to(_compute_dtype(latents))
        ms = self._stats(stats, x.dtype)
        out = x * ms[1] / self.scale + ms[0] if ms else x / self.scale + self.shift
        out = out.to(latents.dtype)
        return unpatchify(out, self.patch) if self.patch > 1 else out

    def preview_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] roughly in [-1, 1]: a linear map of model-space latents, no VAE."""
        self._check(latents)
        x = latents.detach().to("cpu", torch.float32)
        if self.patch > 1:
            x = unpatchify(x, self.patch)
        factors = torch.tensor(self.rgb_factors, dtype=torch.float32)
        rgb = torch.einsum("bchw,ck->bkhw", x, factors)
        if self.rgb_bias is not None:
            rgb = rgb + torch.tensor(self.rgb_bias, dtype=torch.float32).view(1, 3, 1, 1)
        return rgb

    def preview_png(self, latents: torch.Tensor, index: int = 0) -> bytes:
        """PNG bytes of one image of the batch, one pixel per latent cell."""
        rgb = self.preview_rgb(latents[index : index + 1])[0]
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB").save(buf, format="PNG")
        return buf.getvalue()

    def with_vae_config(self, config: dict) -> LatentSpace:
        """This space with the scale/shift a loaded VAE's config states."""
        changes: dict[str, Any] = {}
        if config.get("scaling_factor") is not None:
            changes["scale"] = float(config["scaling_factor"])
        if config.get("shift_factor") is not None:
            changes["shift"] = float(config["shift_factor"])
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            changes["mean"] = tuple(float(v) for v in config["latents_mean"])
            changes["std"] = tuple(float(v) for v in config["latents_std"])
        return replace(self, **changes)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision is computed in float32 and cast back."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, pH, pW] -> [B, C*p*p, H, W], channel-major like diffusers' Flux.2."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C*p*p, H, W] -> [B, C, pH, pW]; the inverse of `patchify`."""
    b, cpp, h, w = x.shape
    c = cpp // (p * p)
    return x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)


# fmt: off
SPACES: dict[str, LatentSpace] = {
    s.id: s
    for s in (
        LatentSpace(
            "sd1", "SD 1.x / 2.x", 4, scale=0.18215,
            rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                         (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
        ),
        LatentSpace(
            "sdxl", "SDXL", 4, scale=0.13025,
            rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                         (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
            rgb_bias=(0.1084, -0.0175, -0.0011),
        ),
        LatentSpace(
            "pg25", "Playground 2.5", 4, scale=0.5,
            mean=(-1.6574, 1.886, -1.383, 2.5155), std=(8.4927, 5.9022, 6.5498, 5.2299),
            rgb_factors=((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653),
                         (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076)),
        ),
        LatentSpace(
            "sd3", "SD3 / SD3.5", 16, scale=1.5305, shift=0.0609, flow=True,
            rgb_factors=(
                (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
                (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
                (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
                (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
                (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
                (-0.1448, -0.1463, -0.1189),
            ),
            rgb_bias=(0.2394, 0.2135, 0.1925),
        ),
        LatentSpace(
            "flux", "FLUX.1", 16, scale=0.3611, shift=0.1159, flow=True,
            rgb_factors=(
                (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
                (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
                (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
                (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
                (-0.1262, -0.0982, -0.0778),
            ),
            rgb_bias=(-0.0329, -0.0718, -0.0851),
        ),
        LatentSpace(
            "flux2", "FLUX.2", 128, patch=2, batchnorm_eps=1e-4, flow=True,
            rgb_factors=(
                (0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644),
                (0.2144, 0.3009, 0.3652), (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160),
                (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109), (-0.3527, -0.2712, -0.1666),
                (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
                (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080),
                (-0.0939, -0.0008, 0.0186), (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127),
                (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065), (0.0128, 0.0101, 0.0142),
                (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
                (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025),
                (0.0220, 0.0169, -0.0048), (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609),
                (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614),
            ),
            rgb_bias=(-0.0329, -0.0718, -0.0851),
        ),
    )
}
# fmt: on


def get_space(space_id: str) -> LatentSpace:
    try:
        return SPACES[space_id]
    except KeyError:
        raise NotFound(f"unknown latent space {space_id!r}; known: {', '.join(SPACES)}") from None
