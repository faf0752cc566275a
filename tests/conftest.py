from __future__ import annotations

import pytest

from services.common.blobs import BlobStore
from services.common.redis_conn import connect
from services.devkit.cluster import RedisClusterServers, RedisServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory) -> str:
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster.url


@pytest.fixture(params=["single", "cluster"])
def redis_client(request):
    """A client of a real single Redis, then of a real 3-master Redis Cluster."""
    url = request.getfixturevalue("redis_url" if request.param == "single" else "redis_cluster_url")
    client = connect(url, "auto")
    yield client
    client.close()


@pytest.fixture
def store(redis_client) -> BlobStore:
    return BlobStore(redis_client, chunk_bytes=1 << 20, ttl_s=600)


@pytest.fixture(scope="session")
def single_store(redis_url) -> BlobStore:
    """A BlobStore on the single test Redis, for tests that are not about Redis itself."""
    return BlobStore(connect(redis_url, "no"))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny sd1, sdxl and a second sdxl model on disk, built once per test run."""
    from tests.denoise_kit import build_models

    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory) -> dict[str, str]:
    """Tiny SD3 (shift 3) and two tiny Flux models (dynamic shifting) on disk."""
    from services.devkit.tiny_models import build

    root = tmp_path_factory.mktemp("flow-models")
    return {
        "sd3": str(build("sd3", root / "sd3")),
        "flux": str(build("flux", root / "flux")),
        "flux_b": str(build("flux", root / "flux_b", seed=5)),
    }


@pytest.fixture(scope="session")
def checked_cluster(tmp_path_factory):
    """One gateway, a denoiser (the demo models), a processor and an interposer, shared by every test
    of what the cluster refuses and how it says so (rules, limits, uploads, error details): those
    tests leave nothing behind that another could trip on."""
    from tests.gateway_kit import Cluster, demo_models

    root = tmp_path_factory.mktemp("checked")
    cluster = Cluster(root, demo_models(root / "models"), interposer_env={}, processor_env={})
    yield cluster
    cluster.stop()
