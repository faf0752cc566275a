import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class LatentScaling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATENT_SCALING_UNSPECIFIED: _ClassVar[LatentScaling]
    LATENT_SCALING_MODEL: _ClassVar[LatentScaling]
    LATENT_SCALING_RAW: _ClassVar[LatentScaling]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
LATENT_SCALING_UNSPECIFIED: LatentScaling
LATENT_SCALING_MODEL: LatentScaling
LATENT_SCALING_RAW: LatentScaling

class BlobHandle(_message.Message):
    __slots__ = ("key", "generation", "media_type", "dtype", "shape", "byte_size", "digest", "chunk_bytes", "expires_at")
    KEY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key: str
    generation: int
    media_type: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_size: int
    digest: str
    chunk_bytes: int
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, key: _Optional[str] = ..., generation: _Optional[int] = ..., media_type: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., byte_size: _Optional[int] = ..., digest: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class NoiseLevel(_message.Message):
    __slots__ = ("fraction", "cutoff_timestep", "timestep", "sigma", "num_train_timesteps")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    cutoff_timestep: int
    timestep: float
    sigma: float
    num_train_timesteps: int
    def __init__(self, fraction: _Optional[float] = ..., cutoff_timestep: _Optional[int] = ..., timestep: _Optional[float] = ..., sigma: _Optional[float] = ..., num_train_timesteps: _Optional[int] = ...) -> None: ...

class SchedulerSpec(_message.Message):
    __slots__ = ("class_name", "config_json", "steps", "state", "mu", "sigmas")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    config_json: str
    steps: int
    state: BlobHandle
    mu: float
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, class_name: _Optional[str] = ..., config_json: _Optional[str] = ..., steps: _Optional[int] = ..., state: _Optional[_Union[BlobHandle, _Mapping]] = ..., mu: _Optional[float] = ..., sigmas: _Optional[_Iterable[float]] = ...) -> None: ...

class LatentHandle(_message.Message):
    __slots__ = ("blob", "space", "scaling", "noise", "scheduler", "seed", "width", "height", "model", "seeds")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    blob: BlobHandle
    space: str
    scaling: LatentScaling
    noise: NoiseLevel
    scheduler: SchedulerSpec
    seed: int
    width: int
    height: int
    model: str
    seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, blob: _Optional[_Union[BlobHandle, _Mapping]] = ..., space: _Optional[str] = ..., scaling: _Optional[_Union[LatentScaling, str]] = ..., noise: _Optional[_Union[NoiseLevel, _Mapping]] = ..., scheduler: _Optional[_Union[SchedulerSpec, _Mapping]] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., model: _Optional[str] = ..., seeds: _Optional[_Iterable[int]] = ...) -> None: ...
