"""`interposer`: convert to another latent space through the interposer service."""

from __future__ import annotations

from services.common.errors import FailedPrecondition
from services.processor.registry import Context, Latents, arg, processor


@processor(
    "interposer",
    "convert finished latents to another latent space (the interposer service)",
    arg("source", "str", "", "source space; default: the latents' own"),
    arg("target", "str", "", "target space", required=True, choices=("sd1", "sdxl", "pg25", "sd3", "flux")),
    arg("method", "str", "auto", "net, vae or auto", choices=("net", "vae", "auto")),
    arg("source-model", "str", "", "model whose VAE decodes (vae method)"),
    arg("target-model", "str", "", "model whose VAE encodes (vae method)"),
)
def interposer(ctx: Context, x: Latents, *, source, target, method, source_model, target_model) -> Latents:
    if ctx.convert is None or ctx.store is None:
        raise FailedPrecondition("the interposer processor needs an interposer service; none is registered")
    handle = x.handle.__class__()
    handle.CopyFrom(x.handle)
    handle.blob.CopyFrom(ctx.store.put_tensor(x.tensor))
    if source:
        handle.space = source
    converted = ctx.convert(handle, target, method, source_model or "", target_model or "", ctx.deadline)
    return Latents(ctx.store.get_tensor(converted.blob), converted)
