"""Our declaration of etcd's messages (flanneld_py/subnet/etcdpb.py) against etcd's own protos, as
aetcd ships them generated: every field we declare has etcd's number, type, cardinality and oneof,
so what we send and read is what etcd means."""

from __future__ import annotations

import pytest

from flanneld_py.subnet import etcdpb

rpc = pytest.importorskip("aetcd.rpc", reason="aetcd (the test extra) carries etcd's generated protos")

# etcd's KeyValue and Event live in package mvccpb, the rest in etcdserverpb.
_THEIRS = {"KeyValue": rpc.KeyValue, "Event": rpc.Event}


def _etcd_descriptor(name: str):  # type: ignore[no-untyped-def]
    return (_THEIRS.get(name) or getattr(rpc, name)).DESCRIPTOR


@pytest.mark.parametrize("name", sorted(etcdpb._MESSAGES))
def test_every_declared_field_is_etcds(name: str) -> None:
    ours = etcdpb._CLASSES[name].DESCRIPTOR
    theirs = _etcd_descriptor(name)
    assert ours.fields, name
    for field in ours.fields:
        etcd_field = theirs.fields_by_name[field.name]
        assert (field.number, field.type, field.is_repeated) == \
            (etcd_field.number, etcd_field.type, etcd_field.is_repeated), (name, field.name)
        if field.message_type is not None:
            assert field.message_type.name == etcd_field.message_type.name
        if field.enum_type is not None:
            ours_values = {value.name: value.number for value in field.enum_type.values}
            etcd_values = {value.name: value.number for value in etcd_field.enum_type.values}
            assert ours_values == etcd_values, (name, field.name)
        oneof = field.containing_oneof
        etcd_oneof = etcd_field.containing_oneof
        assert (oneof.name if oneof else None) == (etcd_oneof.name if etcd_oneof else None), (name, field.name)


def test_a_transaction_encodes_as_etcds_own_messages() -> None:
    """The lease claim's transaction: a compare on create revision 0 (a oneof member, so the 0 is
    sent) and a put bound to a lease; the bytes are those of etcd's messages."""
    ours = etcdpb.message(
        "TxnRequest",
        compare=[etcdpb.message("Compare", key=b"/k", result=etcdpb.COMPARE_EQUAL, target=etcdpb.TARGET_CREATE,
                                create_revision=0),
                 etcdpb.message("Compare", key=b"/k", result=etcdpb.COMPARE_EQUAL, target=etcdpb.TARGET_MOD,
                                mod_revision=7, range_end=b"/l")],
        success=[etcdpb.message("RequestOp", request_put=etcdpb.message("PutRequest", key=b"/k", value=b"v", lease=5))],
    )
    theirs = rpc.TxnRequest(
        compare=[rpc.Compare(key=b"/k", result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=0),
                 rpc.Compare(key=b"/k", result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=7,
                             range_end=b"/l")],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=b"/k", value=b"v", lease=5))],
    )
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert b"\x28\x00" in ours.SerializeToString()  # field 5 (create_revision) = 0, present


def test_a_watch_reply_decodes_with_fields_we_do_not_declare_skipped() -> None:
    reply = rpc.WatchResponse(
        header=rpc.ResponseHeader(cluster_id=1, member_id=2, revision=42, raft_term=3), watch_id=9, created=True,
        events=[rpc.Event(type=rpc.Event.DELETE, kv=rpc.KeyValue(key=b"/a", mod_revision=41),
                          prev_kv=rpc.KeyValue(key=b"/a", value=b"old")),
                rpc.Event(type=rpc.Event.PUT, kv=rpc.KeyValue(key=b"/b", value=b"new", lease=8, mod_revision=42))],
    )
    ours = etcdpb._CLASSES["WatchResponse"].FromString(reply.SerializeToString())
    assert (ours.header.revision, ours.watch_id, ours.created) == (42, 9, True)
    assert [(event.type == etcdpb.EVENT_PUT, event.kv.key, event.kv.value, event.kv.lease, event.kv.mod_revision)
            for event in ours.events] == [(False, b"/a", b"", 0, 41), (True, b"/b", b"new", 8, 42)]
