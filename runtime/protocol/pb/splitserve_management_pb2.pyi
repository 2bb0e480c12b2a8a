from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetRoutingRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class SetRoutingRequest(_message.Message):
    __slots__ = ("model", "config_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    config_json: str
    def __init__(self, model: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class RoutingState(_message.Message):
    __slots__ = ("model", "state_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    state_json: str
    def __init__(self, model: _Optional[str] = ..., state_json: _Optional[str] = ...) -> None: ...
