from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lora(_message.Message):
    __slots__ = ("source", "scale", "weight_name")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NAME_FIELD_NUMBER: _ClassVar[int]
    source: str
    scale: float
    weight_name: str
    def __init__(self, source: _Optional[str] = ..., scale: _Optional[float] = ..., weight_name: _Optional[str] = ...) -> None: ...

class TextualInversion(_message.Message):
    __slots__ = ("source", "token", "weight_name")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NAME_FIELD_NUMBER: _ClassVar[int]
    source: str
    token: str
    weight_name: str
    def __init__(self, source: _Optional[str] = ..., token: _Optional[str] = ..., weight_name: _Optional[str] = ...) -> None: ...

class InspectAdapterRequest(_message.Message):
    __slots__ = ("model", "lora", "textual_inversion")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TEXTUAL_INVERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    lora: Lora
    textual_inversion: TextualInversion
    def __init__(self, model: _Optional[str] = ..., lora: _Optional[_Union[Lora, _Mapping]] = ..., textual_inversion: _Optional[_Union[TextualInversion, _Mapping]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("kind", "file", "digest", "bytes", "components", "tokens")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    file: str
    digest: str
    bytes: int
    components: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., file: _Optional[str] = ..., digest: _Optional[str] = ..., bytes: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...
