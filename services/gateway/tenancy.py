"""Tenants: every job, event stream, idempotency key and blob belongs to the tenant that made it.

A caller sees its own tenant's and nothing else: another tenant's job or blob is NOT_FOUND
with the words a missing one gets, so ids and keys do not leak, guessed ones included. An
admin sees every tenant's. Without authentication every caller is the `default` tenant.

A tenant's blobs are named `<tenant>/...` (uploads `<tenant>/<random>`, stage outputs
`<tenant>/<job>/<stage>`), so a key says whose it is without a read.
"""

from __future__ import annotations

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.auth import DEFAULT_TENANT, Identity
from services.common.blobs import BlobStore
from services.common.errors import BlobNotFound, NotFound


def tenant_of(job: jpb.Job) -> str:
    return job.tenant or DEFAULT_TENANT  # jobs recorded before tenants were the default tenant's


def visible(job: jpb.Job, caller: Identity) -> jpb.Job:
    """`job`, or NOT_FOUND as if it did not exist when it is another tenant's."""
    if not caller.owns(tenant_of(job)):
        raise NotFound(f"job {job.id!r} does not exist or has expired", field="job_id")
    return job


def blob_name(tenant: str, name: str) -> str:
    return f"{tenant}/{name}"


def check_blob_key(key: str, store: BlobStore, caller: Identity, field: str) -> None:
    """NOT_FOUND for a key outside the caller's tenant, worded as for a blob that is gone."""
    if caller.sees_all or key.startswith(store.key_for(blob_name(caller.tenant, "x"))[: -len("x}")]):
        return
    raise BlobNotFound(f"blob {key} does not exist or has expired", field=field)
