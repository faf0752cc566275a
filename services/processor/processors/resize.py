"""`resize`: latent upscale (or downscale) by a factor or to a pixel size."""

from __future__ import annotations

import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.processor.registry import Context, Latents, arg, processor


def pixels_per_cell(x: Latents) -> int:
    """The VAE scale factor, read off the handle's pixel size and the tensor's latent size."""
    return max(x.handle.width // x.tensor.shape[-1], 1) if x.handle.width else 8


@processor(
    "resize",
    "resize the latents: by `scale`, or to `width` x `height` pixels",
    arg("scale", "float", "", "size factor", min=1e-3, max=16.0),
    arg("width", "int", "", "target width in pixels", min=1),
    arg("height", "int", "", "target height in pixels", min=1),
    arg("mode", "str", "bilinear", "interpolation", choices=("nearest", "bilinear", "bicubic", "area")),
)
def resize(ctx: Context, x: Latents, *, scale, width, height, mode: str) -> Latents:
    cell = pixels_per_cell(x)
    h, w = x.tensor.shape[-2:]
    if scale is not None:
        size = (round(h * scale), round(w * scale))
    elif width and height:
        if width % cell or height % cell:
            raise InvalidArgument(f"resize: width and height must be multiples of {cell} pixels (one latent cell)")
        size = (height // cell, width // cell)
    else:
        raise InvalidArgument("resize needs scale, or both width and height")
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = x.with_tensor(
        F.interpolate(x.tensor.to(ctx.device).float(), size=size, mode=mode, **kwargs).to(x.tensor.dtype)
    )
    out.handle.height, out.handle.width = size[0] * cell, size[1] * cell
    return out
