"""A processor defined outside the service, loaded with --plugins (BATON_PLUGINS)."""

from __future__ import annotations

from services.processor.registry import Context, Latents, arg, processor


@processor("invert", "negate the latents (a plugin from the tests)", arg("gain", "float", "1.0", "multiplier", min=0))
def invert(ctx: Context, x: Latents, *, gain: float) -> Latents:
    return x.with_tensor(-gain * x.tensor)
