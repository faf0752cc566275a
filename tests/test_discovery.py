"""Discovery through the gateway: the cluster's models, processors and workers, by RPC and by
`baton models|processors|schedulers|workers`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.errors import Unavailable
from services.gateway.catalog import ModelCatalog
from services.gateway.discovery import cluster_models
from tests.service_procs import REPO


@pytest.fixture(scope="module")
def client(checked_cluster):
    with checked_cluster.client() as c:
        yield c


def run_baton(checked_cluster, *verb: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "services.cli.main", *verb, "--gateway", checked_cluster.gateway.address]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


def baton(checked_cluster, *verb: str) -> str:
    """`baton VERB ... --gateway ADDR`'s output; it must exit 0."""
    done = run_baton(checked_cluster, *verb)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- merging the records ----------------------------------------------------------------------
def test_a_model_on_two_workers_is_one_entry_with_its_best_state_and_both_workers():
    def worker(address: str, state: int, memory: int = 0) -> wpb.WorkerInfo:
        info = dpb.ModelInfo(name="sd1-a", family="sd1", space="sd1", state=state, memory_bytes=memory)
        return wpb.WorkerInfo(address=address, kind="denoiser", models=[info])

    workers = [worker("b:1", dpb.MODEL_STATE_AVAILABLE), worker("a:1", dpb.MODEL_STATE_READY, 5 << 20)]
    [entry] = cluster_models(workers)
    assert (entry.model.state, entry.model.memory_bytes) == (dpb.MODEL_STATE_READY, 5 << 20)
    assert list(entry.workers) == ["a:1", "b:1"]


# -- the RPCs ---------------------------------------------------------------------------------
def test_list_models_shows_the_demo_models_with_family_space_and_worker(checked_cluster, client):
    models = {m.model.name: m for m in client.list_models()}
    assert {"sd1-a", "sd1-b", "sdxl-base", "sdxl-second"} <= set(models)
    sd1 = models["sd1-a"]
    assert (sd1.model.family, sd1.model.space) == ("sd1", "sd1")
    assert models["sdxl-base"].model.family == "sdxl"
    assert list(sd1.workers) == [checked_cluster.denoisers[0].address]


def test_list_processors_shows_scale_with_its_arguments(client):
    scale = {p.name: p for p in client.list_processors()}["scale"]
    factor = {a.name: a for a in scale.args}["factor"]
    assert (factor.type, factor.default, factor.HasField("min")) == ("float", "1.0", True)


def test_list_schedulers_says_how_each_splits(client):
    splits = {s.name: s.split for s in client.list_schedulers()}
    assert splits["EulerDiscreteScheduler"] in ("exact", "state")


def test_list_workers_shows_one_worker_of_each_kind(checked_cluster, client):
    workers = client.list_workers()
    assert sorted(w.kind for w in workers) == ["denoiser", "interposer", "processor"]
    denoiser = next(w for w in workers if w.kind == "denoiser")
    assert denoiser.address == checked_cluster.denoisers[0].address and denoiser.accepting and denoiser.capacity


def test_list_processors_without_a_processor_worker_is_unavailable_not_an_empty_list():
    class NoWorkers:
        async def workers(self, kind):
            return []

        async def call(self, *args, **kwargs):
            raise Unavailable("no processor worker is available")

    with pytest.raises(Unavailable, match="none is registered"):
        asyncio.run(ModelCatalog(NoWorkers()).processor_list(deadline=0))  # type: ignore[arg-type]


# -- the CLI ----------------------------------------------------------------------------------
def test_baton_models_prints_a_table_of_the_models(checked_cluster):
    lines = baton(checked_cluster, "models").splitlines()
    assert lines[0].split() == ["NAME", "STATE", "FAMILY", "SPACE", "MEMORY", "WORKERS"]
    row = next(line for line in lines if line.startswith("sd1-a "))
    assert " sd1 " in row and checked_cluster.denoisers[0].address in row


def test_baton_models_json_prints_one_cluster_model_per_line(checked_cluster):
    entries = [json.loads(line) for line in baton(checked_cluster, "models", "--json").splitlines()]
    assert {"sd1-a", "sdxl-base"} <= {e["model"]["name"] for e in entries}


def test_baton_processors_lists_them_and_shows_one_s_arguments(checked_cluster):
    assert any(line.startswith("scale ") for line in baton(checked_cluster, "processors").splitlines())
    page = baton(checked_cluster, "processors", "scale")
    assert "factor: float = 1.0" in page and "multiplier" in page


def test_baton_schedulers_and_workers_print_tables(checked_cluster):
    assert "EulerDiscreteScheduler" in baton(checked_cluster, "schedulers")
    workers = baton(checked_cluster, "workers")
    assert {"denoiser", "interposer", "processor"} <= {line.split()[0] for line in workers.splitlines()[1:]}


def test_an_unknown_processor_name_fails_naming_the_known_ones(checked_cluster):
    argv = [
        sys.executable,
        "-m",
        "services.cli.main",
        "processors",
        "nope",
        "--gateway",
        checked_cluster.gateway.address,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "scale" in done.stderr and "'nope'" in done.stderr
