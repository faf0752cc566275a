from services.common.api.baton.v1 import handles_pb2 as _handles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProcessRequest(_message.Message):
    __slots__ = ("inputs", "processors", "output_key", "device")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[_handles_pb2.LatentHandle]
    processors: _containers.RepeatedScalarFieldContainer[str]
    output_key: str
    device: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[_handles_pb2.LatentHandle, _Mapping]]] = ..., processors: _Optional[_Iterable[str]] = ..., output_key: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ProcessResponse(_message.Message):
    __slots__ = ("latents", "outputs")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    latents: _handles_pb2.LatentHandle
    outputs: _containers.RepeatedCompositeFieldContainer[_handles_pb2.LatentHandle]
    def __init__(self, latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[_handles_pb2.LatentHandle, _Mapping]]] = ...) -> None: ...

class ProcessorArg(_message.Message):
    __slots__ = ("name", "type", "default", "help", "required", "min", "max", "choices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: str
    help: str
    required: bool
    min: float
    max: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[str] = ..., help: _Optional[str] = ..., required: _Optional[bool] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class ProcessorInfo(_message.Message):
    __slots__ = ("name", "help", "args", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    help: str
    args: _containers.RepeatedCompositeFieldContainer[ProcessorArg]
    inputs: int
    def __init__(self, name: _Optional[str] = ..., help: _Optional[str] = ..., args: _Optional[_Iterable[_Union[ProcessorArg, _Mapping]]] = ..., inputs: _Optional[int] = ...) -> None: ...

class ListProcessorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProcessorsResponse(_message.Message):
    __slots__ = ("processors",)
    PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    processors: _containers.RepeatedCompositeFieldContainer[ProcessorInfo]
    def __init__(self, processors: _Optional[_Iterable[_Union[ProcessorInfo, _Mapping]]] = ...) -> None: ...
