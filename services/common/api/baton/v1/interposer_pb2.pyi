from services.common.api.baton.v1 import handles_pb2 as _handles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConversionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONVERSION_METHOD_UNSPECIFIED: _ClassVar[ConversionMethod]
    CONVERSION_METHOD_AUTO: _ClassVar[ConversionMethod]
    CONVERSION_METHOD_NET: _ClassVar[ConversionMethod]
    CONVERSION_METHOD_VAE: _ClassVar[ConversionMethod]
CONVERSION_METHOD_UNSPECIFIED: ConversionMethod
CONVERSION_METHOD_AUTO: ConversionMethod
CONVERSION_METHOD_NET: ConversionMethod
CONVERSION_METHOD_VAE: ConversionMethod

class ConvertRequest(_message.Message):
    __slots__ = ("latents", "target", "method", "source_model", "target_model", "output_key")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    latents: _handles_pb2.LatentHandle
    target: str
    method: ConversionMethod
    source_model: str
    target_model: str
    output_key: str
    def __init__(self, latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., target: _Optional[str] = ..., method: _Optional[_Union[ConversionMethod, str]] = ..., source_model: _Optional[str] = ..., target_model: _Optional[str] = ..., output_key: _Optional[str] = ...) -> None: ...

class ConvertResponse(_message.Message):
    __slots__ = ("latents", "method")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    latents: _handles_pb2.LatentHandle
    method: ConversionMethod
    def __init__(self, latents: _Optional[_Union[_handles_pb2.LatentHandle, _Mapping]] = ..., method: _Optional[_Union[ConversionMethod, str]] = ...) -> None: ...

class Conversion(_message.Message):
    __slots__ = ("source", "target", "method", "weights")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    method: ConversionMethod
    weights: str
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., method: _Optional[_Union[ConversionMethod, str]] = ..., weights: _Optional[str] = ...) -> None: ...

class ListConversionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConversionsResponse(_message.Message):
    __slots__ = ("conversions",)
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    conversions: _containers.RepeatedCompositeFieldContainer[Conversion]
    def __init__(self, conversions: _Optional[_Iterable[_Union[Conversion, _Mapping]]] = ...) -> None: ...
