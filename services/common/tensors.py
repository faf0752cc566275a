"""Tensor <-> raw little-endian bytes, with the dtype and shape kept in a BlobHandle header."""

from __future__ import annotations

import torch

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import BlobCorrupt, FailedPrecondition, InvalidArgument
from services.common.raw_tensor import DTYPES, dtype_info

# The torch types of Baton's wire dtypes (raw_tensor.DTYPES names them as torch does).
TO_PROTO: dict[torch.dtype, pb.DType] = {getattr(torch, info.name): dtype for dtype, info in DTYPES.items()}
FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in TO_PROTO.items()}


def itemsize(dtype: int) -> int:
    return dtype_info(dtype).itemsize


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
