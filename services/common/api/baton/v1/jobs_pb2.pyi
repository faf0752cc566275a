import datetime

from services.common.api.baton.v1 import adapters_pb2 as _adapters_pb2
from services.common.api.baton.v1 import handles_pb2 as _handles_pb2
from services.common.api.baton.v1 import interposer_pb2 as _interposer_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    STAGE_STATE_PENDING: _ClassVar[StageState]
    STAGE_STATE_RUNNING: _ClassVar[StageState]
    STAGE_STATE_SUCCEEDED: _ClassVar[StageState]
    STAGE_STATE_FAILED: _ClassVar[StageState]
    STAGE_STATE_CANCELLED: _ClassVar[StageState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
STAGE_STATE_UNSPECIFIED: StageState
STAGE_STATE_PENDING: StageState
STAGE_STATE_RUNNING: StageState
STAGE_STATE_SUCCEEDED: StageState
STAGE_STATE_FAILED: StageState
STAGE_STATE_CANCELLED: StageState

class JobSpec(_message.Message):
    __slots__ = ("name", "seed", "width", "height", "inputs", "stages", "outputs", "labels", "timeout_s", "seeds")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    seed: int
    width: int
    height: int
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    stages: _containers.RepeatedCompositeFieldContainer[StageSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputSpec]
    labels: _containers.ScalarMap[str, str]
    timeout_s: float
    seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., stages: _Optional[_Iterable[_Union[StageSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[OutputSpec, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., timeout_s: _Optional[float] = ..., seeds: _Optional[_Iterable[int]] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "path", "blob", "latents", "declared")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    blob: _handles_pb2.BlobHandle
    latents: _handles_pb2.LatentHandle
    declared: DeclaredLevel
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., blob: _Optional[_Union[_handles_pb2.BlobHandle, _Mapping]] = ..., latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., declared: _Optional[_Union[DeclaredLevel, _Mapping]] = ...) -> None: ...

class DeclaredLevel(_message.Message):
    __slots__ = ("space", "scaling", "denoising_end", "timestep", "sigma", "scheduler", "steps", "num_train_timesteps")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    DENOISING_END_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    space: str
    scaling: _handles_pb2.LatentScaling
    denoising_end: float
    timestep: float
    sigma: float
    scheduler: str
    steps: int
    num_train_timesteps: int
    def __init__(self, space: _Optional[str] = ..., scaling: _Optional[_Union[_handles_pb2.LatentScaling, str]] = ..., denoising_end: _Optional[float] = ..., timestep: _Optional[float] = ..., sigma: _Optional[float] = ..., scheduler: _Optional[str] = ..., steps: _Optional[int] = ..., num_train_timesteps: _Optional[int] = ...) -> None: ...

class StageSpec(_message.Message):
    __slots__ = ("name", "denoise", "interpose", "process", "decode", "encode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DENOISE_FIELD_NUMBER: _ClassVar[int]
    INTERPOSE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    denoise: DenoiseStage
    interpose: InterposeStage
    process: ProcessStage
    decode: DecodeStage
    encode: EncodeStage
    def __init__(self, name: _Optional[str] = ..., denoise: _Optional[_Union[DenoiseStage, _Mapping]] = ..., interpose: _Optional[_Union[InterposeStage, _Mapping]] = ..., process: _Optional[_Union[ProcessStage, _Mapping]] = ..., decode: _Optional[_Union[DecodeStage, _Mapping]] = ..., encode: _Optional[_Union[EncodeStage, _Mapping]] = ...) -> None: ...

class DenoiseStage(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "steps", "guidance_scale", "scheduler", "denoising_start", "denoising_end", "latents", "image", "mask", "strength", "seed", "width", "height", "scheduler_config", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "max_sequence_length", "guidance_rescale", "latents_processors", "output_processors", "preview_every", "num_images", "loras", "textual_inversions", "seeds", "restart_solver_history")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    DENOISING_START_FIELD_NUMBER: _ClassVar[int]
    DENOISING_END_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    PROMPT_3_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_3_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    LATENTS_PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    TEXTUAL_INVERSIONS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    RESTART_SOLVER_HISTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    scheduler: str
    denoising_start: float
    denoising_end: float
    latents: str
    image: str
    mask: str
    strength: float
    seed: int
    width: int
    height: int
    scheduler_config: _struct_pb2.Struct
    prompt_2: str
    negative_prompt_2: str
    prompt_3: str
    negative_prompt_3: str
    max_sequence_length: int
    guidance_rescale: float
    latents_processors: _containers.RepeatedScalarFieldContainer[str]
    output_processors: _containers.RepeatedScalarFieldContainer[str]
    preview_every: int
    num_images: int
    loras: _containers.RepeatedCompositeFieldContainer[_adapters_pb2.Lora]
    textual_inversions: _containers.RepeatedCompositeFieldContainer[_adapters_pb2.TextualInversion]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    restart_solver_history: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[str] = ..., denoising_start: _Optional[float] = ..., denoising_end: _Optional[float] = ..., latents: _Optional[str] = ..., image: _Optional[str] = ..., mask: _Optional[str] = ..., strength: _Optional[float] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., scheduler_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., prompt_2: _Optional[str] = ..., negative_prompt_2: _Optional[str] = ..., prompt_3: _Optional[str] = ..., negative_prompt_3: _Optional[str] = ..., max_sequence_length: _Optional[int] = ..., guidance_rescale: _Optional[float] = ..., latents_processors: _Optional[_Iterable[str]] = ..., output_processors: _Optional[_Iterable[str]] = ..., preview_every: _Optional[int] = ..., num_images: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_adapters_pb2.Lora, _Mapping]]] = ..., textual_inversions: _Optional[_Iterable[_Union[_adapters_pb2.TextualInversion, _Mapping]]] = ..., seeds: _Optional[_Iterable[int]] = ..., restart_solver_history: _Optional[bool] = ...) -> None: ...

class InterposeStage(_message.Message):
    __slots__ = ("latents", "target", "method", "source_model", "target_model")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    latents: str
    target: str
    method: _interposer_pb2.ConversionMethod
    source_model: str
    target_model: str
    def __init__(self, latents: _Optional[str] = ..., target: _Optional[str] = ..., method: _Optional[_Union[_interposer_pb2.ConversionMethod, str]] = ..., source_model: _Optional[str] = ..., target_model: _Optional[str] = ...) -> None: ...

class ProcessStage(_message.Message):
    __slots__ = ("latents", "processors", "more_latents")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    MORE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    latents: str
    processors: _containers.RepeatedScalarFieldContainer[str]
    more_latents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, latents: _Optional[str] = ..., processors: _Optional[_Iterable[str]] = ..., more_latents: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeStage(_message.Message):
    __slots__ = ("latents", "model")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    latents: str
    model: str
    def __init__(self, latents: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class EncodeStage(_message.Message):
    __slots__ = ("image", "model", "seed")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    image: str
    model: str
    seed: int
    def __init__(self, image: _Optional[str] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("stage", "format")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    format: str
    def __init__(self, stage: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("name", "kind", "state", "worker", "attempts", "step", "total", "latents", "error", "started_at", "finished_at", "images", "resumed_from", "waiting")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    state: StageState
    worker: str
    attempts: int
    step: int
    total: int
    latents: _handles_pb2.LatentHandle
    error: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    images: _containers.RepeatedCompositeFieldContainer[_handles_pb2.BlobHandle]
    resumed_from: int
    waiting: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., worker: _Optional[str] = ..., attempts: _Optional[int] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., error: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_handles_pb2.BlobHandle, _Mapping]]] = ..., resumed_from: _Optional[int] = ..., waiting: _Optional[str] = ...) -> None: ...

class JobOutput(_message.Message):
    __slots__ = ("stage", "format", "latents", "images")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    stage: str
    format: str
    latents: _handles_pb2.LatentHandle
    images: _containers.RepeatedCompositeFieldContainer[_handles_pb2.BlobHandle]
    def __init__(self, stage: _Optional[str] = ..., format: _Optional[str] = ..., latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_handles_pb2.BlobHandle, _Mapping]]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "error", "stages", "outputs", "idempotency_key", "created_at", "started_at", "finished_at", "expires_at", "info", "queue_position", "tenant")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: JobState
    error: str
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    outputs: _containers.RepeatedCompositeFieldContainer[JobOutput]
    idempotency_key: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    info: _struct_pb2.Struct
    queue_position: int
    tenant: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., error: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[JobOutput, _Mapping]]] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., info: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., queue_position: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("id", "job_id", "time", "job_state", "stage", "progress", "queue", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    job_id: str
    time: _timestamp_pb2.Timestamp
    job_state: JobState
    stage: StageStatus
    progress: StepProgress
    queue: QueueStatus
    error: str
    def __init__(self, id: _Optional[str] = ..., job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_state: _Optional[_Union[JobState, str]] = ..., stage: _Optional[_Union[StageStatus, _Mapping]] = ..., progress: _Optional[_Union[StepProgress, _Mapping]] = ..., queue: _Optional[_Union[QueueStatus, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class QueueStatus(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("stage", "step", "total", "timestep", "preview_png")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total: int
    timestep: float
    preview_png: bytes
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., timestep: _Optional[float] = ..., preview_png: _Optional[bytes] = ...) -> None: ...
