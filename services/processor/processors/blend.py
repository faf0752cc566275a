"""`blend`: a weighted mix of two inputs of the same space (`+` gives the second its chain)."""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.processor.registry import Context, Latents, arg, processor


@processor(
    "blend",
    "mix with the second input: (1 - weight) * this + weight * other",
    arg("weight", "float", "0.5", "share of the second input", min=0.0, max=1.0),
    inputs=2,
)
def blend(ctx: Context, x: Latents, other: Latents, *, weight: float) -> Latents:
    if x.handle.space != other.handle.space:
        raise InvalidArgument(f"blend mixes latents of one space; got {x.handle.space!r} and {other.handle.space!r}")
    if x.tensor.shape != other.tensor.shape:
        raise InvalidArgument(f"blend needs equal shapes; got {list(x.tensor.shape)} and {list(other.tensor.shape)}")
    a, b = x.tensor.to(ctx.device), other.tensor.to(ctx.device, x.tensor.dtype)
    return x.with_tensor((1 - weight) * a + weight * b)
