"""The Python client of Baton's gateway: BatonClient (sync) and AsyncBatonClient (asyncio)."""

from services.client.async_client import AsyncBatonClient
from services.client.batch import RowResult
from services.client.batch_runs import AsyncBatchRun, BatchRun
from services.client.errors import error_info, field_violations
from services.client.sync_client import BatonClient

__all__ = [
    "AsyncBatchRun",
    "AsyncBatonClient",
    "BatchRun",
    "BatonClient",
    "RowResult",
    "error_info",
    "field_violations",
]
