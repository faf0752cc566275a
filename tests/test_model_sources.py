"""What a request may name as a model: configured models, and the sources `model-sources` allows
(local roots, symlinks and `..` followed; hub organisations and repos); refused at the denoiser
and, at Submit, naming the stage and `denoise.model`."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format

from services.client import error_info, field_violations
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.denoiser.cache import ModelCache
from services.denoiser.model_sources import ModelSourceRefused, ModelSources, admit, allowed
from services.denoiser.models import LoadOptions, load_model
from services.denoiser.service import SETTINGS
from services.devkit.tiny_models import build
from tests.denoise_kit import request
from tests.gateway_kit import Cluster, wait_for_job


@pytest.fixture
def tree(tmp_path):
    """/allowed/model, /outside/model, and a link in /allowed to /outside."""
    for folder in ("allowed/model", "outside/model"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "allowed" / "link").symlink_to(tmp_path / "outside")
    return tmp_path


def rooted(tree, text: str = "", configured=()) -> ModelSources:
    return ModelSources.parse(",".join(filter(None, [str(tree / "allowed"), text])), configured)


# -- the rule --------------------------------------------------------------------------------
def test_a_folder_inside_a_root_is_allowed(tree):
    assert allowed(str(tree / "allowed" / "model"), rooted(tree))


def test_a_folder_outside_every_root_is_refused(tree):
    assert not allowed(str(tree / "outside" / "model"), rooted(tree))


def test_a_dot_dot_escape_from_a_root_is_refused(tree):
    assert not allowed(str(tree / "allowed" / ".." / "outside" / "model"), rooted(tree))


def test_a_symlink_out_of_a_root_is_refused(tree):
    assert not allowed(str(tree / "allowed" / "link" / "model"), rooted(tree))


def test_a_symlinked_root_allows_what_lies_inside_its_target(tree):
    sources = ModelSources.parse(str(tree / "allowed" / "link"))
    assert allowed(str(tree / "outside" / "model"), sources)
    assert not allowed(str(tree / "allowed" / "model"), sources)


def test_a_relative_folder_is_judged_by_where_it_resolves(tree, monkeypatch):
    monkeypatch.chdir(tree / "allowed")
    assert allowed("model", rooted(tree))
    assert not allowed("../outside/model", rooted(tree))


def test_an_allowed_local_source_loads_by_its_real_path(tree):
    real = (tree / "allowed" / "model").resolve()
    assert admit(str(tree / "allowed" / "x" / ".." / "model"), rooted(tree)) == str(real)


def test_hub_org_patterns_allow_that_organisation_s_repos_only():
    sources = ModelSources.parse("hub:stabilityai/*")
    assert allowed("stabilityai/stable-diffusion-xl-base-1.0", sources)
    assert not allowed("stabilityai-fork/stable-diffusion-xl-base-1.0", sources)
    assert not allowed("black-forest-labs/FLUX.1-dev", sources)


def test_a_hub_repo_pattern_allows_that_repo_only():
    sources = ModelSources.parse("hub:black-forest-labs/FLUX.1-dev")
    assert allowed("black-forest-labs/FLUX.1-dev", sources)
    assert not allowed("black-forest-labs/FLUX.1-schnell", sources)


def test_hub_star_allows_any_repo_but_no_local_folder(tree):
    sources = ModelSources.parse("hub:*")
    assert allowed("someone/some-model", sources)
    assert not allowed(str(tree / "allowed" / "model"), sources)


def test_a_hub_shaped_name_that_is_a_local_folder_is_judged_as_a_folder(tree, monkeypatch):
    monkeypatch.chdir(tree)  # the loader would read ./outside/model, not the hub repo
    assert not allowed("outside/model", ModelSources.parse("hub:outside/*"))


def test_a_name_that_is_no_hub_id_is_never_a_hub_repo():
    sources = ModelSources.parse("hub:*")
    for name in ("stabilityai/..", "org/../../etc", "a--b/c", "org/name/extra", "-org/x"):
        assert not allowed(name, sources), name


def test_configured_models_are_always_allowed(tree):
    sources = ModelSources.parse("", configured=["sd1", str(tree / "outside" / "model")])
    assert allowed("sd1", sources) and allowed(str(tree / "outside" / "model"), sources)
    assert not allowed("sdxl", sources) and not allowed("stabilityai/sdxl", sources)


def test_the_default_allows_configured_models_only():
    [setting] = [s for s in SETTINGS if s.name == "model-sources"]
    assert setting.default == "" and ModelSources.parse(setting.default) == ModelSources()


@pytest.mark.parametrize("text", ["models", "hub:", "hub:org", "hub:org/*/x", "hub:*/x", "hub:a/b*"])
def test_a_pattern_of_neither_form_is_refused_at_startup(text):
    with pytest.raises(ValueError, match="hub:org/\\*"):
        ModelSources.parse(text)


def test_a_refusal_names_the_field_the_setting_and_the_configured_models(tree):
    with pytest.raises(ModelSourceRefused) as info:
        admit(str(tree / "outside" / "model"), rooted(tree, configured=["sd1"]))
    assert info.value.code == "FAILED_PRECONDITION" and info.value.field == "model"
    assert "model-sources" in info.value.detail and "BATON_MODEL_SOURCES" in info.value.detail
    assert "(sd1)" in info.value.detail and str(tree / "allowed") in info.value.detail


# -- the model cache -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny sd1 model inside an allowed root and one outside it."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "root": root,
        "inside": str(build("sd1", root / "allowed" / "sd1")),
        "outside": str(build("sd1", root / "outside" / "sd1", seed=1)),
    }


class RecordingLoader:
    def __init__(self):
        self.sources: list[str] = []

    def __call__(self, name, source, options):
        self.sources.append(source)
        return load_model(name, source, options)


def cache_for(tiny, loader) -> ModelCache:
    sources = ModelSources.parse(str(tiny["root"] / "allowed"), configured=["alias"])
    return ModelCache(loader, defaults=LoadOptions(), aliases={"alias": tiny["outside"]}, sources=sources)


def test_load_on_demand_of_a_path_outside_the_sources_is_refused_before_loading(tiny):
    loader = RecordingLoader()
    cache = cache_for(tiny, loader)
    with pytest.raises(ModelSourceRefused, match="model-sources"), cache.use(tiny["outside"]):
        pass
    with pytest.raises(ModelSourceRefused):
        cache.load(tiny["outside"])  # LoadModel
    with pytest.raises(ModelSourceRefused):
        cache.inspect(tiny["outside"])  # InspectModel
    assert loader.sources == [] and cache.cards() == []


def test_an_alias_loads_whatever_its_source_and_an_allowed_path_loads_on_demand(tiny):
    loader = RecordingLoader()
    cache = cache_for(tiny, loader)
    cache.load("alias")
    with cache.use(tiny["inside"]) as model:
        assert model.family.name == "sd1"
    assert loader.sources == [tiny["outside"], tiny["inside"]]


# -- a live cluster --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tiny):
    c = Cluster(
        tiny["root"] / "cluster",
        {"sd1-a": tiny["outside"]},
        denoiser_env={"BATON_MODEL_SOURCES": str(tiny["root"] / "allowed")},
    )
    yield c
    c.stop()


def job(model: str) -> jpb.JobSpec:
    stages = [{"name": "draft", "denoise": {"model": model, "prompt": "a cat", "steps": 2}}]
    return json_format.ParseDict({"name": "sources", "seed": 1, "stages": stages}, jpb.JobSpec())


def test_submit_naming_a_model_outside_the_sources_is_refused_naming_denoise_model(cluster, tiny):
    with cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.submit(job(tiny["outside"]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "stage 'draft'" in info.value.details() and "model-sources" in info.value.details()
    [violation] = field_violations(info.value)
    assert violation.field == "stages[draft].denoise.model"
    assert dict(error_info(info.value).metadata) == {"stage": "draft", "field": "denoise.model"}


def test_submit_naming_an_alias_or_a_model_inside_the_sources_runs(cluster, tiny):
    with cluster.client() as client:
        for model in ("sd1-a", tiny["inside"]):
            done = wait_for_job(client, client.submit(job(model)).id)
            assert done.state == jpb.JOB_STATE_SUCCEEDED, (model, done)


@pytest.mark.parametrize("rpc", ["Denoise", "LoadModel", "InspectModel"])
def test_the_denoiser_refuses_a_model_outside_its_sources_naming_model(cluster, tiny, rpc):
    stub = denoiser_pb2_grpc.DenoiserStub(cluster.denoisers[0].channel)
    calls = {
        "Denoise": lambda: list(stub.Denoise(request(tiny["outside"], steps=2), timeout=60)),
        "LoadModel": lambda: stub.LoadModel(dpb.LoadModelRequest(model=tiny["outside"]), timeout=60),
        "InspectModel": lambda: stub.InspectModel(dpb.InspectModelRequest(model=tiny["outside"]), timeout=60),
    }
    with pytest.raises(grpc.RpcError) as info:
        calls[rpc]()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [violation] = field_violations(info.value)
    assert violation.field == "model" and "BATON_MODEL_SOURCES" in violation.description
    assert error_info(info.value).reason == "MODEL_SOURCE_REFUSED"
