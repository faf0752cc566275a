"""Limits on what one job may ask for: settings that the gateway and every worker read alike.

The gateway refuses a spec past a limit at Submit, before any GPU work; a worker applies the
same limits to the requests it is sent (directly, or by a gateway configured differently), so
its memory is bounded by its configuration and never by a spec. Set them once for the whole
cluster (one ConfigMap of BATON_MAX_* variables) so the gateway and its workers agree.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields

from services.common.config import Setting, parse_settings


def _devices(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip())


SETTINGS = (
    Setting("max-pixels", 2048 * 2048, "pixels of one image (width x height) a stage may make or read", int),
    Setting(
        "max-latent-elements",
        64 * 4 * 128 * 128,
        "latent values of one batch (images x channels x latent height x width); bounds a worker's memory "
        "(the default is 64 SDXL images at 1024x1024, or 16 Flux ones)",
        int,
    ),
    Setting("max-steps", 1000, "inference steps of one schedule", int),
    Setting("max-num-images", 64, "images one denoise stage may draw (num_images)", int),
    Setting(
        "max-job-timeout", 86400.0, "largest timeout_s a spec may ask for, in seconds (0 asks for the default)", float
    ),
    Setting("max-guidance", 100.0, "largest |guidance_scale|", float),
    Setting("max-prompt-chars", 20000, "characters of one prompt", int),
    Setting(
        "processor-devices",
        ("cpu", "cuda", "cuda:N", "mps"),
        "device values a processor URI may name (cuda:N stands for any cuda:<index>)",
        _devices,
    ),
)


@dataclass(frozen=True)
class Limits:
    """The values of SETTINGS; DEFAULT holds their defaults."""

    max_pixels: int
    max_latent_elements: int
    max_steps: int
    max_num_images: int
    max_job_timeout: float
    max_guidance: float
    max_prompt_chars: int
    processor_devices: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: argparse.Namespace) -> Limits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def device_allowed(self, device: str) -> bool:
        """Whether a processor may be sent to `device` ("" is the service's own)."""
        if not device:
            return True
        indexed = re.fullmatch(r"([a-z]+):\d+", device)
        return device in self.processor_devices or (
            indexed is not None and f"{indexed.group(1)}:N" in self.processor_devices
        )


DEFAULT = Limits.from_settings(parse_settings(SETTINGS, environ={}))
