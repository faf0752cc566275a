"""Idempotency keys: the same key with the same spec is the same job, the same key with another
spec is refused FAILED_PRECONDITION naming the key; a spec is fingerprinted as sent, its input
blobs by their digests."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from google.protobuf import json_format

from services.client import error_info, field_violations
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import FailedPrecondition
from services.common.redis_conn import connect_async
from services.gateway.jobs import JobStore, spec_fingerprint
from tests.gateway_kit import wait_for_job


def spec(prompt: str = "a cat", **top) -> jpb.JobSpec:
    return json_format.ParseDict(
        {"name": "idem", "width": 64, "height": 64, **top,
         "stages": [{"name": "d", "denoise": {"model": "sd1-a", "prompt": prompt, "steps": 2}}]},
        jpb.JobSpec(),
    )  # fmt: skip


def with_image(key: str, generation: int = 1, digest: str = "xxh3-128:00ff") -> jpb.JobSpec:
    out = spec()
    blob = pb.BlobHandle(key=key, generation=generation, media_type="image/png", shape=[64, 64, 3], digest=digest)
    out.inputs.add(name="photo", blob=blob)
    return out


# -- the fingerprint --------------------------------------------------------------------------
def test_the_same_spec_has_the_same_fingerprint():
    assert spec_fingerprint(spec()) == spec_fingerprint(spec())


def test_another_prompt_has_another_fingerprint():
    assert spec_fingerprint(spec("a cat")) != spec_fingerprint(spec("a dog"))


def test_an_input_uploaded_again_under_another_key_with_the_same_digest_has_the_same_fingerprint():
    first, again = with_image("baton:blob:{default/aa}", 1), with_image("baton:blob:{default/bb}", 3)
    assert spec_fingerprint(first) == spec_fingerprint(again)
    assert spec_fingerprint(first) != spec_fingerprint(with_image("baton:blob:{default/aa}", 1, "xxh3-128:0100"))


def test_scheduler_config_keys_in_another_order_have_the_same_fingerprint():
    one = spec()
    one.stages[0].denoise.scheduler_config.update({"shift": 3.0, "use_karras_sigmas": True})
    other = spec()
    other.stages[0].denoise.scheduler_config.update({"use_karras_sigmas": True, "shift": 3.0})
    assert spec_fingerprint(one) == spec_fingerprint(other)


def test_a_record_written_before_fingerprints_matches_any_spec(redis_url):
    async def body() -> tuple[str, str]:
        client = connect_async(redis_url, "no")
        try:
            store = JobStore(client, prefix=f"t{uuid.uuid4().hex[:8]}")
            old = store.new_job(spec("a cat"), "k")
            created, _ = await store.create(old, "", time.time() + 60)
            await client.set(f"{store.prefix}:idem:{{/k}}", created.id)  # as an earlier gateway wrote it
            found, made = await store.create(store.new_job(spec("a dog"), "k"), "k", time.time() + 60, "f" * 64)
            assert not made
            return found.id, created.id
        finally:
            await client.aclose()

    found, earlier = asyncio.run(body())
    assert found == earlier


def test_a_key_used_for_another_spec_is_a_failed_precondition_in_the_store(redis_url):
    async def body() -> None:
        client = connect_async(redis_url, "no")
        try:
            store = JobStore(client, prefix=f"t{uuid.uuid4().hex[:8]}")
            first, _ = await store.create(store.new_job(spec("a cat")), "k", time.time() + 60, "a" * 64)
            again, made = await store.create(store.new_job(spec("a cat")), "k", time.time() + 60, "a" * 64)
            assert (again.id, made) == (first.id, False)
            with pytest.raises(FailedPrecondition, match=f"job {first.id}"):
                await store.create(store.new_job(spec("a dog")), "k", time.time() + 60, "b" * 64)
        finally:
            await client.aclose()

    asyncio.run(body())


# -- through the gateway ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(checked_cluster):
    with checked_cluster.client() as c:
        yield c


def test_the_same_key_and_spec_without_a_seed_give_the_same_job(client):
    key = f"idem-{uuid.uuid4().hex[:8]}"
    first = client.submit(spec(), idempotency_key=key)  # the gateway draws a seed for each Submit
    second = client.submit(spec(), idempotency_key=key)
    assert second.id == first.id
    assert wait_for_job(client, first.id).state == jpb.JOB_STATE_SUCCEEDED


def test_the_same_key_with_another_spec_is_refused_naming_the_key(client):
    key = f"idem-{uuid.uuid4().hex[:8]}"
    first = client.submit(spec("a cat", seed=1), idempotency_key=key)
    with pytest.raises(grpc.RpcError) as info:
        client.submit(spec("a dog", seed=1), idempotency_key=key)
    error = info.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"idempotency key {key!r}" in error.details() and first.id in error.details()
    assert [v.field for v in field_violations(error)] == ["idempotency_key"]
    assert error_info(error).metadata["field"] == "idempotency_key"
    assert wait_for_job(client, first.id).state == jpb.JOB_STATE_SUCCEEDED
