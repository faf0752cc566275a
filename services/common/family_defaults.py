"""The defaults diffusers' pipelines use per family and mode, as plain data.

The gateway resolves a stage's guidance and strength from here when it plans the request, and
the denoiser's families take theirs from here for requests that leave them unset (a direct
caller), so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where the incoming latents stand: none, initial noise, part-way, or finished.
TXT2IMG, FROM_NOISE, CONTINUE, IMG2IMG, INPAINT = "txt2img", "from_noise", "continue", "img2img", "inpaint"


@dataclass(frozen=True)
class FamilyDefaults:
    guidance: float
    img2img_guidance: float
    inpaint_guidance: float
    strength: float
    inpaint_strength: float
    # Flow-matching pipelines (SD3, Flux) start img2img on the unrounded step count.
    flow: bool = False

    def guidance_for(self, mode: str) -> float:
        return {IMG2IMG: self.img2img_guidance, INPAINT: self.inpaint_guidance}.get(mode, self.guidance)

    def strength_for(self, mode: str) -> float:
        return self.inpaint_strength if mode == INPAINT else self.strength


DEFAULTS = {
    "sd1": FamilyDefaults(guidance=7.5, img2img_guidance=7.5, inpaint_guidance=7.5, strength=0.8, inpaint_strength=1.0),
    # StableDiffusionXLPipeline 5.0, its inpainting pipeline 7.5 and strength 0.9999.
    "sdxl": FamilyDefaults(
        guidance=5.0, img2img_guidance=5.0, inpaint_guidance=7.5, strength=0.3, inpaint_strength=0.9999
    ),
    # KolorsPipeline and KolorsImg2ImgPipeline 5.0, strength 0.3. diffusers has no Kolors inpainting pipeline;
    # Kwai-Kolors' own is SDXL's inpainting pipeline with Kolors' prompts, and keeps its 7.5 and 0.9999.
    "kolors": FamilyDefaults(
        guidance=5.0, img2img_guidance=5.0, inpaint_guidance=7.5, strength=0.3, inpaint_strength=0.9999
    ),
    # StableDiffusion3Pipeline, its img2img and its inpainting pipeline: 7.0; strength 0.6 for both.
    "sd3": FamilyDefaults(
        guidance=7.0, img2img_guidance=7.0, inpaint_guidance=7.0, strength=0.6, inpaint_strength=0.6, flow=True
    ),
    # FluxPipeline 3.5; FluxImg2ImgPipeline and FluxInpaintPipeline 7.0, strength 0.6.
    "flux": FamilyDefaults(
        guidance=3.5, img2img_guidance=7.0, inpaint_guidance=7.0, strength=0.6, inpaint_strength=0.6, flow=True
    ),
}
