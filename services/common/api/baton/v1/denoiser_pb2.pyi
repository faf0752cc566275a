from services.common.api.baton.v1 import adapters_pb2 as _adapters_pb2
from services.common.api.baton.v1 import handles_pb2 as _handles_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_OFFLOADED: _ClassVar[ModelState]
    MODEL_STATE_AVAILABLE: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_OFFLOADED: ModelState
MODEL_STATE_AVAILABLE: ModelState

class DenoiseRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "steps", "guidance_scale", "scheduler", "scheduler_config", "denoising_start", "denoising_end", "latents", "image", "mask", "strength", "seed", "width", "height", "num_images", "preview_every", "max_sequence_length", "guidance_rescale", "output_key", "loras", "textual_inversions", "seeds", "restart_solver_history")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    PROMPT_3_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_3_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    DENOISING_START_FIELD_NUMBER: _ClassVar[int]
    DENOISING_END_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    TEXTUAL_INVERSIONS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    RESTART_SOLVER_HISTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    prompt_2: str
    negative_prompt_2: str
    prompt_3: str
    negative_prompt_3: str
    steps: int
    guidance_scale: float
    scheduler: str
    scheduler_config: _struct_pb2.Struct
    denoising_start: float
    denoising_end: float
    latents: _handles_pb2.LatentHandle
    image: _handles_pb2.BlobHandle
    mask: _handles_pb2.BlobHandle
    strength: float
    seed: int
    width: int
    height: int
    num_images: int
    preview_every: int
    max_sequence_length: int
    guidance_rescale: float
    output_key: str
    loras: _containers.RepeatedCompositeFieldContainer[_adapters_pb2.Lora]
    textual_inversions: _containers.RepeatedCompositeFieldContainer[_adapters_pb2.TextualInversion]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    restart_solver_history: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., prompt_2: _Optional[str] = ..., negative_prompt_2: _Optional[str] = ..., prompt_3: _Optional[str] = ..., negative_prompt_3: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[str] = ..., scheduler_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., denoising_start: _Optional[float] = ..., denoising_end: _Optional[float] = ..., latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., image: _Optional[_Union[_handles_pb2.BlobHandle, _Mapping]] = ..., mask: _Optional[_Union[_handles_pb2.BlobHandle, _Mapping]] = ..., strength: _Optional[float] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_images: _Optional[int] = ..., preview_every: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., guidance_rescale: _Optional[float] = ..., output_key: _Optional[str] = ..., loras: _Optional[_Iterable[_Union[_adapters_pb2.Lora, _Mapping]]] = ..., textual_inversions: _Optional[_Iterable[_Union[_adapters_pb2.TextualInversion, _Mapping]]] = ..., seeds: _Optional[_Iterable[int]] = ..., restart_solver_history: _Optional[bool] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("step", "total", "timestep", "sigma", "preview_png", "elapsed_s", "checkpoint")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    timestep: float
    sigma: float
    preview_png: bytes
    elapsed_s: float
    checkpoint: bool
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., timestep: _Optional[float] = ..., sigma: _Optional[float] = ..., preview_png: _Optional[bytes] = ..., elapsed_s: _Optional[float] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class DenoiseResult(_message.Message):
    __slots__ = ("latents", "elapsed_s", "resumed_from")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    latents: _handles_pb2.LatentHandle
    elapsed_s: float
    resumed_from: int
    def __init__(self, latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., elapsed_s: _Optional[float] = ..., resumed_from: _Optional[int] = ...) -> None: ...

class WindowStatus(_message.Message):
    __slots__ = ("phase", "queue_position", "resumed_from")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    phase: str
    queue_position: int
    resumed_from: int
    def __init__(self, phase: _Optional[str] = ..., queue_position: _Optional[int] = ..., resumed_from: _Optional[int] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("step", "result", "status")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    step: StepEvent
    result: DenoiseResult
    status: WindowStatus
    def __init__(self, step: _Optional[_Union[StepEvent, _Mapping]] = ..., result: _Optional[_Union[DenoiseResult, _Mapping]] = ..., status: _Optional[_Union[WindowStatus, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "width", "height", "seed", "output_key", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    width: int
    height: int
    seed: int
    output_key: str
    images: _containers.RepeatedCompositeFieldContainer[_handles_pb2.BlobHandle]
    def __init__(self, model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., output_key: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_handles_pb2.BlobHandle, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("latents",)
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    latents: _handles_pb2.LatentHandle
    def __init__(self, latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "latents", "format", "output_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    latents: _handles_pb2.LatentHandle
    format: str
    output_key: str
    def __init__(self, model: _Optional[str] = ..., latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., format: _Optional[str] = ..., output_key: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("width", "height", "images")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    images: _containers.RepeatedCompositeFieldContainer[_handles_pb2.BlobHandle]
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., images: _Optional[_Iterable[_Union[_handles_pb2.BlobHandle, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "source", "family", "space", "state", "dtype", "device", "memory_bytes", "vae_scale_factor", "latent_channels", "default_width", "default_height", "default_scheduler", "size_multiple")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VAE_SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    family: str
    space: str
    state: ModelState
    dtype: str
    device: str
    memory_bytes: int
    vae_scale_factor: int
    latent_channels: int
    default_width: int
    default_height: int
    default_scheduler: str
    size_multiple: int
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., family: _Optional[str] = ..., space: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., vae_scale_factor: _Optional[int] = ..., latent_channels: _Optional[int] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., default_scheduler: _Optional[str] = ..., size_multiple: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class InspectModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "dtype", "variant", "family")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    variant: str
    family: str
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., variant: _Optional[str] = ..., family: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
