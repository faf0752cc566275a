import datetime

from services.common.api.baton.v1 import denoiser_pb2 as _denoiser_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "address", "kind", "models", "load_on_demand", "in_flight", "capacity", "device", "heartbeat_at", "accepting", "queued", "max_queued")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOAD_ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    kind: str
    models: _containers.RepeatedCompositeFieldContainer[_denoiser_pb2.ModelInfo]
    load_on_demand: bool
    in_flight: int
    capacity: int
    device: str
    heartbeat_at: _timestamp_pb2.Timestamp
    accepting: bool
    queued: int
    max_queued: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., kind: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_denoiser_pb2.ModelInfo, _Mapping]]] = ..., load_on_demand: _Optional[bool] = ..., in_flight: _Optional[int] = ..., capacity: _Optional[int] = ..., device: _Optional[str] = ..., heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accepting: _Optional[bool] = ..., queued: _Optional[int] = ..., max_queued: _Optional[int] = ...) -> None: ...
