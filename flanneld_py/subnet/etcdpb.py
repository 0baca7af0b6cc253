"""etcd v3's gRPC messages and methods that flannel's records need, declared here.

Only the messages and fields the registry sends or reads, with etcd's field numbers
(``etcdserver/etcdserverpb/rpc.proto``, ``mvcc/mvccpb/kv.proto``): fields left out are
kept as unknown fields on receipt and never sent. The declaration is encoded as a
``FileDescriptorProto`` by hand (no protoc, no ``descriptor_pb2``) and loaded into a
descriptor pool of its own, so it never clashes with another copy of etcd's protos in
the same process. Declaring only these keeps the generated stubs of every etcd service
(and the client library around them) out of the daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory

__all__ = ["COMPARE_EQUAL", "EVENT_PUT", "TARGET_CREATE", "TARGET_MOD", "EtcdStub", "message"]

# FieldDescriptorProto's type and label numbers.
_INT64, _BOOL, _STRING, _MESSAGE, _BYTES, _ENUM = 3, 8, 9, 11, 12, 14
_OPTIONAL, _REPEATED = 1, 3

_Field = tuple[str, int, int, str, bool, str]  # name, number, type, message or enum type, repeated, oneof


def _f(name: str, number: int, kind: int, type_name: str = "", *, repeated: bool = False, oneof: str = "") -> _Field:
    return name, number, kind, type_name, repeated, oneof


_MESSAGES: dict[str, list[_Field]] = {
    "ResponseHeader": [_f("revision", 3, _INT64)],
    "KeyValue": [
        _f("key", 1, _BYTES), _f("create_revision", 2, _INT64),
        _f("mod_revision", 3, _INT64), _f("version", 4, _INT64),
        _f("value", 5, _BYTES), _f("lease", 6, _INT64),
    ],
    "Event": [_f("type", 1, _ENUM, "EventType"), _f("kv", 2, _MESSAGE, "KeyValue")],
    "RangeRequest": [_f("key", 1, _BYTES), _f("range_end", 2, _BYTES)],
    "RangeResponse": [
        _f("header", 1, _MESSAGE, "ResponseHeader"), _f("kvs", 2, _MESSAGE, "KeyValue", repeated=True),
        _f("more", 3, _BOOL), _f("count", 4, _INT64),
    ],
    "PutRequest": [
        _f("key", 1, _BYTES), _f("value", 2, _BYTES), _f("lease", 3, _INT64),
    ],
    "RequestOp": [_f("request_put", 2, _MESSAGE, "PutRequest", oneof="request")],
    # target_union is a oneof in etcd: a create_revision or mod_revision of 0 is sent, not dropped.
    "Compare": [
        _f("result", 1, _ENUM, "CompareResult"), _f("target", 2, _ENUM, "CompareTarget"),
        _f("key", 3, _BYTES),
        _f("create_revision", 5, _INT64, oneof="target_union"),
        _f("mod_revision", 6, _INT64, oneof="target_union"),
        _f("range_end", 64, _BYTES),
    ],
    "TxnRequest": [
        _f("compare", 1, _MESSAGE, "Compare", repeated=True), _f("success", 2, _MESSAGE, "RequestOp", repeated=True),
        _f("failure", 3, _MESSAGE, "RequestOp", repeated=True),
    ],
    "TxnResponse": [_f("header", 1, _MESSAGE, "ResponseHeader"), _f("succeeded", 2, _BOOL)],
    "LeaseGrantRequest": [_f("TTL", 1, _INT64), _f("ID", 2, _INT64)],
    "LeaseGrantResponse": [
        _f("header", 1, _MESSAGE, "ResponseHeader"), _f("ID", 2, _INT64),
        _f("TTL", 3, _INT64), _f("error", 4, _STRING),
    ],
    "LeaseRevokeRequest": [_f("ID", 1, _INT64)],
    "LeaseRevokeResponse": [_f("header", 1, _MESSAGE, "ResponseHeader")],
    "LeaseKeepAliveRequest": [_f("ID", 1, _INT64)],
    "LeaseKeepAliveResponse": [
        _f("header", 1, _MESSAGE, "ResponseHeader"), _f("ID", 2, _INT64),
        _f("TTL", 3, _INT64),
    ],
    "LeaseTimeToLiveRequest": [_f("ID", 1, _INT64), _f("keys", 2, _BOOL)],
    "LeaseTimeToLiveResponse": [
        _f("header", 1, _MESSAGE, "ResponseHeader"), _f("ID", 2, _INT64),
        _f("TTL", 3, _INT64), _f("grantedTTL", 4, _INT64),
    ],
    "WatchCreateRequest": [
        _f("key", 1, _BYTES), _f("range_end", 2, _BYTES),
        _f("start_revision", 3, _INT64),
    ],
    "WatchRequest": [_f("create_request", 1, _MESSAGE, "WatchCreateRequest", oneof="request_union")],
    "WatchResponse": [
        _f("header", 1, _MESSAGE, "ResponseHeader"), _f("watch_id", 2, _INT64),
        _f("created", 3, _BOOL), _f("canceled", 4, _BOOL),
        _f("compact_revision", 5, _INT64), _f("cancel_reason", 6, _STRING),
        _f("events", 11, _MESSAGE, "Event", repeated=True),
    ],
    "AuthenticateRequest": [_f("name", 1, _STRING), _f("password", 2, _STRING)],
    "AuthenticateResponse": [_f("header", 1, _MESSAGE, "ResponseHeader"), _f("token", 2, _STRING)],
}
_ENUMS: dict[str, list[tuple[str, int]]] = {
    "EventType": [("PUT", 0), ("DELETE", 1)],
    "CompareResult": [("EQUAL", 0), ("GREATER", 1), ("LESS", 2), ("NOT_EQUAL", 3)],
    "CompareTarget": [("VERSION", 0), ("CREATE", 1), ("MOD", 2), ("VALUE", 3), ("LEASE", 4)],
}
_PACKAGE = "etcdserverpb"

EVENT_PUT = 0
COMPARE_EQUAL = 0
TARGET_CREATE, TARGET_MOD = 1, 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _text(number: int, value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _tag(number, 2) + _varint(len(raw)) + raw


def _number(number: int, value: int) -> bytes:
    return _tag(number, 0) + _varint(value)


def _field(field: _Field, oneofs: list[str]) -> bytes:
    name, number, kind, type_name, repeated, oneof = field
    out = _text(1, name) + _number(3, number) + _number(4, _REPEATED if repeated else _OPTIONAL) + _number(5, kind)
    if type_name:
        out += _text(6, f".{_PACKAGE}.{type_name}")
    if oneof:
        out += _number(9, oneofs.index(oneof))
    return out


def _message(name: str, fields: list[_Field]) -> bytes:
    oneofs = list(dict.fromkeys(field[5] for field in fields if field[5]))
    out = _text(1, name) + b"".join(_text(2, _field(field, oneofs)) for field in fields)
    return out + b"".join(_text(8, _text(1, oneof)) for oneof in oneofs)


def _enum(name: str, values: list[tuple[str, int]]) -> bytes:
    return _text(1, name) + b"".join(_text(2, _text(1, value) + _number(2, number)) for value, number in values)


def file_descriptor() -> bytes:
    """The declaration above as a serialized ``google.protobuf.FileDescriptorProto``."""
    return (_text(1, "flanneld_py/etcd.proto") + _text(2, _PACKAGE)
            + b"".join(_text(4, _message(name, fields)) for name, fields in _MESSAGES.items())
            + b"".join(_text(5, _enum(name, values)) for name, values in _ENUMS.items())
            + _text(12, "proto3"))


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(file_descriptor())
_CLASSES: dict[str, Any] = {
    name: message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _MESSAGES
}


def message(type_name: str, /, **fields: Any) -> Any:
    """A new message of that type (e.g. ``message("RangeRequest", key=b"k")``)."""
    return _CLASSES[type_name](**fields)


def _method(kind: Callable[..., Any], path: str, request: str, reply: str) -> Any:
    return kind(path, request_serializer=_CLASSES[request].SerializeToString,
                response_deserializer=_CLASSES[reply].FromString)


class EtcdStub:
    """The etcd methods flannel uses, on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.range = _method(channel.unary_unary, "/etcdserverpb.KV/Range", "RangeRequest", "RangeResponse")
        self.txn = _method(channel.unary_unary, "/etcdserverpb.KV/Txn", "TxnRequest", "TxnResponse")
        self.lease_grant = _method(channel.unary_unary, "/etcdserverpb.Lease/LeaseGrant", "LeaseGrantRequest",
                                   "LeaseGrantResponse")
        self.lease_revoke = _method(channel.unary_unary, "/etcdserverpb.Lease/LeaseRevoke", "LeaseRevokeRequest",
                                    "LeaseRevokeResponse")
        self.lease_keepalive = _method(channel.stream_stream, "/etcdserverpb.Lease/LeaseKeepAlive",
                                       "LeaseKeepAliveRequest", "LeaseKeepAliveResponse")
        self.lease_time_to_live = _method(channel.unary_unary, "/etcdserverpb.Lease/LeaseTimeToLive",
                                          "LeaseTimeToLiveRequest", "LeaseTimeToLiveResponse")
        self.watch = _method(channel.stream_stream, "/etcdserverpb.Watch/Watch", "WatchRequest", "WatchResponse")
        self.authenticate = _method(channel.unary_unary, "/etcdserverpb.Auth/Authenticate", "AuthenticateRequest",
                                    "AuthenticateResponse")
