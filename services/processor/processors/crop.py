"""`crop`: a rectangle of the latents, in pixels (multiples of one latent cell)."""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.processor.processors.resize import pixels_per_cell
from services.processor.registry import Context, Latents, arg, processor


@processor(
    "crop",
    "keep a rectangle: left, top, width, height in pixels",
    arg("left", "int", "0", "left edge in pixels", min=0),
    arg("top", "int", "0", "top edge in pixels", min=0),
    arg("width", "int", "", "width in pixels", required=True, min=1),
    arg("height", "int", "", "height in pixels", required=True, min=1),
)
def crop(ctx: Context, x: Latents, *, left: int, top: int, width: int, height: int) -> Latents:
    cell = pixels_per_cell(x)
    if any(v % cell for v in (left, top, width, height)):
        raise InvalidArgument(f"crop: left, top, width and height must be multiples of {cell} pixels")
    h, w = x.tensor.shape[-2:]
    t0, l0, ch, cw = top // cell, left // cell, height // cell, width // cell
    if t0 + ch > h or l0 + cw > w:
        raise InvalidArgument(f"crop: the rectangle leaves the {w * cell}x{h * cell} image")
    out = x.with_tensor(x.tensor[..., t0 : t0 + ch, l0 : l0 + cw].contiguous())
    out.handle.width, out.handle.height = width, height
    return out
