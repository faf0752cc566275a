"""The latent-space registry: scaling round trips and previews."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.latent_spaces import SPACES, get_space, patchify, unpatchify

PLAIN = ["sd1", "sdxl", "pg25", "sd3", "flux"]


def flux2_stats() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(128, generator=g), torch.rand(128, generator=g) * 4 + 0.1


@pytest.mark.parametrize("space_id", PLAIN)
def test_to_raw_inverts_to_model(space_id):
    space = get_space(space_id)
    raw = torch.randn(2, space.channels, 9, 7, dtype=torch.float64)
    back = space.to_raw(space.to_model(raw))
    torch.testing.assert_close(back, raw, rtol=1e-12, atol=1e-12)
    model = torch.randn(1, space.channels, 5, 5)
    torch.testing.assert_close(space.to_model(space.to_raw(model)), model, rtol=1e-5, atol=1e-6)


def test_published_constants_are_applied_on_the_right_side():
    raw = torch.ones(1, 16, 2, 2)
    assert torch.allclose(get_space("sd3").to_model(raw), torch.full_like(raw, (1 - 0.0609) * 1.5305))
    assert torch.allclose(get_space("sd1").to_raw(torch.ones(1, 4, 1, 1)), torch.full((1, 4, 1, 1), 1 / 0.18215))
    pg = get_space("pg25").to_model(torch.zeros(1, 4, 1, 1)).reshape(-1)
    expected = torch.tensor(
        [1.6574 * 0.5 / 8.4927, -1.886 * 0.5 / 5.9022, 1.383 * 0.5 / 6.5498, -2.5155 * 0.5 / 5.2299]
    )
    torch.testing.assert_close(pg, expected)


def test_flux2_round_trip_uses_the_vae_batchnorm_stats_and_2x2_patches():
    space = get_space("flux2")
    raw = torch.randn(1, 32, 8, 12, dtype=torch.float64)
    model = space.to_model(raw, flux2_stats())
    assert model.shape == (1, 128, 4, 6)
    torch.testing.assert_close(space.to_raw(model, flux2_stats()), raw)
    with pytest.raises(FailedPrecondition, match="BatchNorm"):
        space.to_raw(model)


def test_patchify_matches_the_published_unpatchify_layout():
    t = torch.randn(2, 128, 3, 5)
    published = t.reshape(2, 32, 2, 2, 3, 5).permute(0, 1, 4, 2, 5, 3).reshape(2, 32, 6, 10)
    assert torch.equal(unpatchify(t, 2), published)
    assert torch.equal(patchify(published, 2), t)


@pytest.mark.parametrize("space_id", list(SPACES))
def test_preview_is_a_png_of_the_latent_size(space_id):
    space = get_space(space_id)
    latents = torch.randn(2, space.channels, 12, 20)
    image = Image.open(io.BytesIO(space.preview_png(latents, index=1)))
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (20 * space.patch, 12 * space.patch)


def test_preview_maps_channels_through_the_published_factors():
    latents = torch.zeros(1, 4, 1, 1)
    latents[0, 0] = 1.0  # channel 0 alone: sd1's first factor row
    pixel = Image.open(io.BytesIO(get_space("sd1").preview_png(latents))).getpixel((0, 0))
    assert pixel == tuple(round((f + 1) * 127.5) for f in (0.3512, 0.2297, 0.3227))
    zero = Image.open(io.BytesIO(get_space("sdxl").preview_png(torch.zeros(1, 4, 1, 1)))).getpixel((0, 0))
    assert zero == tuple(round((b + 1) * 127.5) for b in (0.1084, -0.0175, -0.0011))


def test_wrong_channel_count_is_invalid_argument():
    with pytest.raises(InvalidArgument, match=r"sd3 latents are \[B, 16, H, W\]"):
        get_space("sd3").to_raw(torch.zeros(1, 4, 8, 8))


def test_unknown_space_is_not_found_listing_the_known_ones():
    with pytest.raises(NotFound, match="sd1, sdxl"):
        get_space("sd4")


def test_a_vae_config_overrides_the_published_constants():
    space = get_space("flux").with_vae_config({"scaling_factor": 0.5, "shift_factor": 0.25})
    assert space.to_model(torch.ones(1, 16, 1, 1)).flatten()[0].item() == pytest.approx(0.375)
