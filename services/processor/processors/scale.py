"""`scale`: multiply latents, optionally normalised to unit standard deviation and clamped."""

from __future__ import annotations

from services.processor.registry import Context, Latents, arg, processor


@processor(
    "scale",
    "multiply the latents by a factor (after normalising, before clamping)",
    arg("factor", "float", "1.0", "multiplier", min=1e-12),
    arg("normalize", "bool", "false", "divide by the tensor's standard deviation first"),
    arg("clamp-min", "float", "", "lowest value kept"),
    arg("clamp-max", "float", "", "highest value kept"),
)
def scale(ctx: Context, x: Latents, *, factor: float, normalize: bool, clamp_min, clamp_max) -> Latents:
    t = x.tensor.to(ctx.device)
    if normalize:
        t = t / t.std()
    t = t * factor
    if clamp_min is not None or clamp_max is not None:
        t = t.clamp(min=clamp_min, max=clamp_max)
    return x.with_tensor(t)
