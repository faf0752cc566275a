"""DeclaredLevel: where latents made by another tool stand on their schedule, said by the user.

A dgenerate or diffusers `output_type="latent"` file is a bare tensor: nothing in it says that
the producer stopped at denoising_end 0.8, so Baton reads it as finished latents. The input's
`declared` says it instead, and the gateway writes it into the input's handle at Submit, so
the planner and the denoiser check and continue it like the handle of a Baton stage.

Every form of the level becomes the handle's `fraction` on diffusers' noise-level rule
(`cutoff = round(T - f * T)`; the continuation runs the timesteps strictly below the cutoff):
- `denoising_end` f is the fraction itself, exactly what diffusers' denoising_start pairs with;
- `timestep` t, the producer's next timestep, means "run t and what lies below it", so the
  cutoff is floor(t) + 1 and f = (T - cutoff) / T;
- `sigma` s is the timestep s * T, in flow-matching spaces only: a discrete schedule's sigma
  depends on its betas, which the gateway does not hold (declare the timestep there).

Only latents that no Baton stage made take a declaration (their handle names no model): a Baton
file or handle already says where it stands, and two sources of truth would disagree.
"""

from __future__ import annotations

import math

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from services.common.latent_spaces import SPACES
from services.common.rules.denoise import cutoff
from services.common.rules.scheduler import check_name

DEFAULT_T = 1000  # diffusers' num_train_timesteps for every family Baton serves


def declared_level(declared: jpb.DeclaredLevel) -> pb.NoiseLevel:
    """The NoiseLevel a declaration means; InvalidArgument naming the field of `declared` at fault."""
    T = declared.num_train_timesteps or DEFAULT_T
    if T < 1:
        raise InvalidArgument(f"num_train_timesteps is {T}; it is a positive count", field="num_train_timesteps")
    form = declared.WhichOneof("level")
    if form is None:
        raise InvalidArgument(
            "say where the latents stand: denoising_end (the producer's), timestep or sigma", field="denoising_end"
        )
    value = getattr(declared, form)
    if not math.isfinite(value):
        raise InvalidArgument(f"{form} is {value}; it must be finite", field=form)
    if form == "denoising_end":
        if not 0.0 < value < 1.0:
            raise InvalidArgument(
                f"denoising_end {value} is not part way: declare 0 < denoising_end < 1 (finished latents need no "
                "declaration; pure noise starts a text-to-image window)",
                field=form,
            )
        return pb.NoiseLevel(fraction=value, cutoff_timestep=cutoff(value, T), num_train_timesteps=T)
    if form == "sigma":
        if not SPACES[declared.space].flow:
            raise InvalidArgument(
                f"a sigma on {declared.space}'s discrete schedule depends on the producer's betas; declare its "
                "timestep or denoising_end instead",
                field=form,
            )
        if not 0.0 < value < 1.0:
            raise InvalidArgument(f"sigma {value} is not part way: a flow schedule's sigmas lie in (0, 1)", field=form)
    timestep = value * T if form == "sigma" else value
    if not 0.0 <= timestep < T - 1:
        raise InvalidArgument(
            f"{form} {value} is not part way through a {T}-timestep schedule: the producer's next timestep lies in "
            f"[0, {T - 1})",
            field=form,
        )
    edge = math.floor(timestep) + 1  # the continuation runs the timesteps strictly below this one
    level = pb.NoiseLevel(fraction=(T - edge) / T, cutoff_timestep=edge, timestep=timestep, num_train_timesteps=T)
    if form == "sigma":
        level.sigma = value
    return level


def apply_declared(handle: pb.LatentHandle, declared: jpb.DeclaredLevel) -> None:
    """Writes the declaration into the input's handle: space, scaling, noise level and the producer's
    scheduler (no state: another tool's file has none). Idempotent; fields named within `declared`."""
    if handle.model:
        raise InvalidArgument(
            f"these latents were made by {handle.model} in Baton and say where they stand; drop `declared`",
            field="space",
        )
    if declared.space not in SPACES:
        known = ", ".join(SPACES)
        raise InvalidArgument(f"unknown latent space {declared.space!r}; declare one of {known}", field="space")
    if handle.space and handle.space != declared.space:
        raise InvalidArgument(
            f"the latents say they are in the {handle.space!r} space, not {declared.space!r}", field="space"
        )
    if declared.steps < 0:
        raise InvalidArgument(f"steps is {declared.steps}; it is a count of steps", field="steps")
    if declared.scheduler:
        check_name(declared.scheduler)
    elif declared.steps:
        raise InvalidArgument("steps describe the producer's scheduler: name it too", field="scheduler")
    handle.noise.CopyFrom(declared_level(declared))
    handle.space = declared.space
    if declared.scaling != pb.LATENT_SCALING_UNSPECIFIED:
        handle.scaling = declared.scaling
    elif handle.scaling == pb.LATENT_SCALING_UNSPECIFIED:
        handle.scaling = pb.LATENT_SCALING_MODEL
    handle.scheduler.CopyFrom(pb.SchedulerSpec(class_name=declared.scheduler, steps=declared.steps))


def apply_declarations(spec: jpb.JobSpec) -> None:
    """Applies every input's declaration to its handle, in place; errors name `inputs[n].declared.<field>`.

    A path input keeps its declaration for the client to upload first; an image input takes none."""
    for n, item in enumerate(spec.inputs):
        if not item.HasField("declared"):
            continue
        source = item.WhichOneof("source")
        if source == "blob":
            raise InvalidArgument(
                "a declared noise level is for latents inputs; this one is an image", field=f"inputs[{n}].declared"
            )
        if source != "latents":
            continue
        try:
            apply_declared(item.latents, item.declared)
        except InvalidArgument as exc:
            raise exc.at(field=f"inputs[{n}].declared.{exc.field}" if exc.field else f"inputs[{n}].declared") from exc
