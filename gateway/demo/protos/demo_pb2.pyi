from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SayRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class SayReply(_message.Message):
    __slots__ = ("text", "model_id", "environment", "deployment_id", "request_id", "plane", "region")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLANE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    text: str
    model_id: str
    environment: str
    deployment_id: str
    request_id: str
    plane: str
    region: str
    def __init__(self, text: _Optional[str] = ..., model_id: _Optional[str] = ..., environment: _Optional[str] = ..., deployment_id: _Optional[str] = ..., request_id: _Optional[str] = ..., plane: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
