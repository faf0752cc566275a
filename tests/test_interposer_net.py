"""The v4.0 interposer: published layout, strict loading, numerics against an independent forward, scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from services.common.errors import InvalidArgument
from services.common.latent_spaces import get_space
from services.interposer.net import (
    PUBLISHED_CHANNELS,
    PUBLISHED_PAIRS,
    SPACE_TO_PUBLISHED,
    InterposerNet,
    convert,
    load_interposer,
    weights_filename,
)

MID = 64
BLOCKS = 12


def published_state(ch_in: int, ch_out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict written from the documented v4.0 key list, not from InterposerNet."""
    g = torch.Generator().manual_seed(seed)

    def conv(prefix: str, cin: int, cout: int) -> dict[str, torch.Tensor]:
        std = (cin * 9) ** -0.5
        return {
            f"{prefix}.weight": torch.randn(cout, cin, 3, 3, generator=g) * std,
            f"{prefix}.bias": torch.randn(cout, generator=g) * 0.05,
        }

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": 1 + 0.2 * torch.randn(MID, generator=g),
            f"{prefix}.bias": 0.1 * torch.randn(MID, generator=g),
            f"{prefix}.running_mean": 0.3 * torch.randn(MID, generator=g),
            f"{prefix}.running_var": 0.5 + torch.rand(MID, generator=g),
            f"{prefix}.num_batches_tracked": torch.tensor(1234, dtype=torch.int64),
        }

    state = conv("head.short", ch_in, MID)
    state |= conv("head.long.0", ch_in, MID) | conv("head.long.2", MID, MID) | conv("head.long.4", MID, MID)
    for i in range(1, BLOCKS + 1):
        state |= norm(f"core.{i}.norm")
        for j in (0, 2, 4):
            state |= conv(f"core.{i}.long.{j}", MID, MID)
    state |= norm(f"core.{BLOCKS + 1}")
    state |= conv("tail", MID, ch_out)
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, scale: float) -> torch.Tensor:
    """The published v4.0 forward pass in eval mode, in torch.nn.functional only."""

    def conv(prefix: str, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, state[f"{prefix}.weight"], state[f"{prefix}.bias"], padding=1)

    def long(prefix: str, t: torch.Tensor) -> torch.Tensor:
        t = F.silu(conv(f"{prefix}.0", t))
        t = F.silu(conv(f"{prefix}.2", t))
        return conv(f"{prefix}.4", t)  # dropout is the identity in eval mode

    def norm(prefix: str, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            t,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    h = F.relu(conv("head.short", x) + long("head.long", x))
    h = F.interpolate(h, scale_factor=scale, mode="nearest")
    for i in range(1, BLOCKS + 1):
        n = norm(f"core.{i}.norm", h)
        h = F.relu(n + long(f"core.{i}.long", n))
    h = F.silu(norm(f"core.{BLOCKS + 1}", h))
    return conv("tail", h)


def test_twelve_pairs_are_published():
    assert len(PUBLISHED_PAIRS) == 12
    assert not any(dst in ("fx", "ca") for _, dst in PUBLISHED_PAIRS)
    assert set(SPACE_TO_PUBLISHED) == {"sd1", "sdxl", "sd3", "flux"}


@pytest.mark.parametrize(("src", "dst"), PUBLISHED_PAIRS)
def test_published_file_loads_strictly(tmp_path, src, dst):
    path = tmp_path / weights_filename(src, dst)
    save_file(published_state(PUBLISHED_CHANNELS[src], PUBLISHED_CHANNELS[dst]), path)
    net = load_interposer(path, src, dst)
    assert not net.training
    assert path.name == f"{src}-to-{dst}_interposer-v4.0.safetensors"


@pytest.mark.parametrize(
    ("ch_in", "ch_out", "count"), [(4, 4, 1_411_972), (16, 4, 1_425_796), (4, 16, 1_418_896), (16, 16, 1_432_720)]
)
def test_parameter_count(ch_in, ch_out, count):
    net = InterposerNet(ch_in, ch_out)
    assert sum(p.numel() for p in net.parameters()) == count
    assert (
        sum(v.numel() for k, v in published_state(ch_in, ch_out).items() if "running" not in k and "num_" not in k)
        == count
    )
    assert 1.41e6 <= count <= 1.43e6 + 1e4


def _refused(tmp_path, state) -> str:
    path = tmp_path / weights_filename("v1", "xl")
    save_file(state, path)
    with pytest.raises(InvalidArgument) as info:
        load_interposer(path, "v1", "xl")
    assert str(path) in str(info.value)
    return str(info.value)


def test_renamed_key_is_refused(tmp_path):
    state = published_state(4, 4)
    state["head.long.1.weight"] = state.pop("head.long.2.weight")
    message = _refused(tmp_path, state)
    assert "'head.long.2.weight'" in message and "'head.long.1.weight'" in message


def test_missing_key_is_refused(tmp_path):
    state = published_state(4, 4)
    del state["core.7.norm.running_var"]
    assert "missing key 'core.7.norm.running_var'" in _refused(tmp_path, state)


def test_extra_key_is_refused(tmp_path):
    state = published_state(4, 4)
    state["core.14.weight"] = torch.ones(64)
    assert "unexpected key 'core.14.weight'" in _refused(tmp_path, state)


def test_wrong_shape_is_refused(tmp_path):
    # A 16-channel tail in a file loaded as v1 -> xl (4 channels).
    state = published_state(4, 16)
    message = _refused(tmp_path, state)
    assert "'tail.weight'" in message and "[16, 64, 3, 3]" in message and "[4, 64, 3, 3]" in message


@pytest.mark.parametrize(("src", "dst"), [("v1", "xl"), ("fx", "v3"), ("ca", "v1")])
def test_forward_matches_the_published_layout(tmp_path, src, dst):
    ch_in, ch_out = PUBLISHED_CHANNELS[src], PUBLISHED_CHANNELS[dst]
    state = published_state(ch_in, ch_out, seed=7)
    path = tmp_path / weights_filename(src, dst)
    save_file(state, path)
    net = load_interposer(path, src, dst)
    x = torch.randn(2, ch_in, 12, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = net(x)
    expected = reference_forward(state, x, 0.5 if src == "ca" else 1.0)
    assert got.shape == expected.shape == (2, ch_out, *((6, 8) if src == "ca" else (12, 16)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_convert_uses_source_constants_in_and_target_constants_out():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sd1, sdxl = get_space("sd1"), get_space("sdxl")
    out = convert(torch.nn.Identity(), x, sd1, sdxl)
    torch.testing.assert_close(out, sdxl.to_model(sd1.to_raw(x)))
    torch.testing.assert_close(out, x / 0.18215 * 0.13025)
    swapped = x / 0.13025 * 0.18215
    assert not torch.allclose(out, swapped)


def test_convert_applies_the_source_shift_on_the_way_in():
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sd3, flux = get_space("sd3"), get_space("flux")
    # 16 -> 16 through the identity: sd3 model -> raw (shift 0.0609), raw -> flux model (shift 0.1159).
    out = convert(torch.nn.Identity(), x, sd3, flux)
    torch.testing.assert_close(out, ((x / 1.5305 + 0.0609) - 0.1159) * 0.3611)
    assert not torch.allclose(out, ((x / 0.3611 + 0.1159) - 0.0609) * 1.5305)


def test_convert_sd3_to_sd1_runs_the_net_on_raw_latents():
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    # A stand-in net that keeps the first 4 channels of the raw latent.
    first4 = torch.nn.Conv2d(16, 4, 1, bias=False)
    with torch.no_grad():
        first4.weight.zero_()
        first4.weight[:, :4, 0, 0] = torch.eye(4)
    out = convert(first4, x, get_space("sd3"), get_space("sd1"))
    torch.testing.assert_close(out, (x[:, :4] / 1.5305 + 0.0609) * 0.18215)


def test_convert_returns_the_input_dtype():
    x = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    out = convert(torch.nn.Identity(), x, get_space("sd1"), get_space("sdxl"))
    assert out.dtype == torch.bfloat16
