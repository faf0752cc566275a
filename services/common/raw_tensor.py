"""RawTensor: a tensor the way Baton's blobs carry it (little-endian bytes, a DType, a shape), without torch.

The client and the CLI hold tensors this way, so that neither needs torch installed: an upload
sends the bytes as they are, a download keeps them, and a latents file is read and written
byte for byte (bfloat16 included, which numpy has no type for). `numpy()` and `torch()` give an
array or a tensor when the caller wants one; torch is imported only there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    import numpy as np
    import torch

if sys.byteorder != "little":  # the wire format is little-endian; so is every machine we run on
    raise ImportError("Baton's tensor codec needs a little-endian machine")

TENSOR = "application/x-baton-tensor"


@dataclass(frozen=True)
class DTypeInfo:
    name: str  # torch's and numpy's name, and safetensors' serialize name
    itemsize: int
    code: str  # the safetensors header's dtype
    numpy: str | None  # numpy's type, where numpy has one


# fmt: off
DTYPES: dict[pb.DType, DTypeInfo] = {
    pb.DTYPE_FLOAT32: DTypeInfo("float32", 4, "F32", "<f4"),
    pb.DTYPE_FLOAT16: DTypeInfo("float16", 2, "F16", "<f2"),
    pb.DTYPE_BFLOAT16: DTypeInfo("bfloat16", 2, "BF16", None),
    pb.DTYPE_FLOAT64: DTypeInfo("float64", 8, "F64", "<f8"),
    pb.DTYPE_UINT8: DTypeInfo("uint8", 1, "U8", "u1"),
    pb.DTYPE_INT8: DTypeInfo("int8", 1, "I8", "i1"),
    pb.DTYPE_INT16: DTypeInfo("int16", 2, "I16", "<i2"),
    pb.DTYPE_INT32: DTypeInfo("int32", 4, "I32", "<i4"),
    pb.DTYPE_INT64: DTypeInfo("int64", 8, "I64", "<i8"),
    pb.DTYPE_BOOL: DTypeInfo("bool", 1, "BOOL", "?"),
}
# fmt: on
FLOATS = frozenset({pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64})
BY_NAME = {info.name: dtype for dtype, info in DTYPES.items()}
BY_CODE = {info.code: dtype for dtype, info in DTYPES.items()}


def dtype_info(dtype: int) -> DTypeInfo:
    try:
        return DTYPES[dtype]  # type: ignore[index]
    except KeyError:
        name = pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)
        raise InvalidArgument(f"unsupported tensor dtype {name}") from None


@dataclass(frozen=True)
class RawTensor:
    """Bytes, a DType and a shape that fit each other (checked when made)."""

    data: bytes
    dtype: pb.DType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        count = 1
        for n in self.shape:
            count *= n
        expected = count * dtype_info(self.dtype).itemsize
        if len(self.data) != expected:
            raise InvalidArgument(
                f"{len(self.data)} bytes do not hold a {self.dtype_name} tensor of shape {list(self.shape)} "
                f"({expected} bytes)"
            )

    @property
    def dtype_name(self) -> str:
        return dtype_info(self.dtype).name

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS

    def reshape(self, shape: tuple[int, ...] | list[int]) -> RawTensor:
        return RawTensor(self.data, self.dtype, tuple(shape))

    def numpy(self) -> np.ndarray:
        """A read-only numpy view of the bytes; bfloat16 has no numpy type: use torch()."""
        import numpy as np

        kind = dtype_info(self.dtype).numpy
        if kind is None:
            raise InvalidArgument(f"numpy has no {self.dtype_name}; use .torch(), or ask for float32 latents")
        return np.frombuffer(self.data, dtype=np.dtype(kind)).reshape(self.shape)

    def torch(self) -> torch.Tensor:
        """A torch tensor of these bytes (a copy, so it is writable); needs torch installed."""
        import torch

        dtype = getattr(torch, self.dtype_name)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(dtype).reshape(self.shape)

    @classmethod
    def of(cls, value: Any) -> RawTensor:
        """A RawTensor from a RawTensor, a numpy array or a torch tensor (torch is not imported for the others)."""
        if isinstance(value, RawTensor):
            return value
        module = type(value).__module__.split(".")[0]
        if module == "torch":
            return cls._from_torch(value)
        if module == "numpy":
            return cls._from_numpy(value)
        raise InvalidArgument(f"expected a numpy array or a torch tensor, got {type(value).__name__}")

    @classmethod
    def _from_numpy(cls, array: Any) -> RawTensor:
        import numpy as np

        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if array.dtype.name not in BY_NAME:
            raise InvalidArgument(f"unsupported array dtype {array.dtype}; supported: {sorted(BY_NAME)}")
        return cls(np.ascontiguousarray(little).tobytes(), BY_NAME[array.dtype.name], tuple(array.shape))

    @classmethod
    def _from_torch(cls, tensor: Any) -> RawTensor:
        import torch

        name = str(tensor.dtype).removeprefix("torch.")
        if name not in BY_NAME:
            raise InvalidArgument(f"unsupported tensor dtype {tensor.dtype}; supported: {sorted(BY_NAME)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return cls(data, BY_NAME[name], tuple(tensor.shape))
