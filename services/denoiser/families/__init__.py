"""Model families, one per file. A family maps its diffusers pipelines onto a denoise window."""

from __future__ import annotations

from services.common.errors import FailedPrecondition, InvalidArgument
from services.denoiser.families.base import Family
from services.denoiser.families.flux import Flux
from services.denoiser.families.kolors import Kolors
from services.denoiser.families.sd1 import SD1
from services.denoiser.families.sd3 import SD3
from services.denoiser.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1(), SDXL(), SD3(), Flux(), Kolors())}


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidArgument(f"unknown family {name!r}; known: {', '.join(FAMILIES)}", field="family") from None


def family_for_pipeline(class_name: str) -> Family:
    """The family whose pipelines include `class_name` (from a model_index.json)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_names:
            return family
    known = sorted(n for f in FAMILIES.values() for n in f.pipeline_names)
    raise FailedPrecondition(
        f"{class_name} models are not supported by this denoiser; supported pipelines: {', '.join(known)}",
        field="model",
    )
