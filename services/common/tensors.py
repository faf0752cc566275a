"""Tensor <-> raw little-endian bytes, with the dtype and shape kept in a BlobHandle header."""

from __future__ import annotations

import sys

import torch

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import BlobCorrupt, FailedPrecondition, InvalidArgument

if sys.byteorder != "little":  # the wire format is little-endian; so is every machine we run on
    raise ImportError("Baton's tensor codec needs a little-endian machine")

TO_PROTO: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int8: pb.DTYPE_INT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.bool: pb.DTYPE_BOOL,
}
FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in TO_PROTO.items()}


def itemsize(dtype: int) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def torch_dtype(dtype: int) -> torch.dtype:
    try:
        return FROM_PROTO[dtype]
    except KeyError:
        raise InvalidArgument(
            f"unsupported tensor dtype {pb.DType.Name(dtype) if dtype in pb.DType.values() else dtype}"
        ) from None


def tensor_bytes(t: torch.Tensor) -> tuple[memoryview, pb.DType, list[int]]:
    """A byte view of `t` (copied only when it is not contiguous or not on the CPU)."""
    if t.dtype not in TO_PROTO:
        raise InvalidArgument(f"unsupported tensor dtype {t.dtype}; supported: {sorted(map(str, TO_PROTO))}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b""), TO_PROTO[t.dtype], list(t.shape)
    raw = flat.view(torch.uint8).numpy().data  # a buffer over the tensor's memory, no copy
    return raw.cast("B"), TO_PROTO[t.dtype], list(t.shape)


def tensor_from_bytes(buf: bytearray, dtype: int, shape: list[int]) -> torch.Tensor:
    """Wraps `buf` (no copy) as a tensor of the header's dtype and shape."""
    tdtype = torch_dtype(dtype)
    count = 1
    for n in shape:
        count *= n
    expected = count * itemsize(dtype)
    if len(buf) != expected:
        raise BlobCorrupt(f"{len(buf)} bytes do not hold a {tdtype} tensor of shape {list(shape)} ({expected} bytes)")
    if expected == 0:
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(tdtype).reshape(shape)


def check_finite(t: torch.Tensor, what: str, causes: str) -> None:
    """A stage whose output overflowed fails, naming `what` and the likely `causes`, rather than
    hand NaN or inf latents on as a result."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise FailedPrecondition(f"{what} holds NaN or inf values; likely causes: {causes}", field="latents")
