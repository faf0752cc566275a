"""The scheduler rules the gateway applies without diffusers: names, options, splits, and the listing."""

from __future__ import annotations

import inspect

import diffusers
import grpc
import pytest

from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.rules.scheduler import SUPPORTED, check_scheduler
from services.common.scheduler_options import OPTIONS


def diffusers_options(name: str) -> set[str] | None:
    """The keyword arguments of the diffusers class; None for a dummy (its optional package is missing)."""
    cls = getattr(diffusers, name)
    if getattr(cls, "_backends", None):
        return None
    params = inspect.signature(cls).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_options_table_is_the_installed_diffusers_signature(name):
    found = diffusers_options(name)
    if found is None:
        pytest.skip(f"{name} needs a package not installed here")
    assert OPTIONS[name] == found


def test_every_supported_scheduler_has_its_options():
    assert set(OPTIONS) == set(SUPPORTED)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("euler", "'euler' is EulerDiscreteScheduler here"),
        ("DPM++ 2M", "'DPM++ 2M' is DPMSolverMultistepScheduler here"),
        ("EulerScheduler", "did you mean EulerDiscreteScheduler?"),
        ("UniPCMultistepSchedular", "did you mean UniPCMultistepScheduler?"),
    ],
)
def test_an_unknown_name_gets_the_class_it_most_likely_means(name, hint):
    with pytest.raises(InvalidArgument) as refused:
        check_scheduler(name, {}, partial=False)
    assert refused.value.field == "scheduler" and hint in refused.value.detail
    assert "Supported: DDIMScheduler, " in refused.value.detail


def test_a_configured_split_is_judged_on_its_config_not_only_its_class():
    check_scheduler("DPMSolverMultistepScheduler", {}, partial=True)
    with pytest.raises(InvalidArgument, match="sde-dpmsolver"):
        check_scheduler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, partial=True)
    check_scheduler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, partial=False)


def test_the_gateway_lists_the_schedulers_and_how_each_splits(checked_cluster):
    with grpc.insecure_channel(checked_cluster.gateway.address) as channel:
        listed = gateway_pb2_grpc.GatewayStub(channel).ListSchedulers(gpb.ListSchedulersRequest(), timeout=10)
    by_name = {s.name: s for s in listed.schedulers}
    assert list(by_name) == list(SUPPORTED)
    assert by_name["EulerDiscreteScheduler"].split == "exact"
    assert by_name["DPMSolverMultistepScheduler"].split == "state"
    ancestral = by_name["EulerAncestralDiscreteScheduler"]
    assert ancestral.split == "never" and ancestral.stochastic and "to split" in ancestral.why
    assert "use_karras_sigmas" in by_name["EulerDiscreteScheduler"].options
