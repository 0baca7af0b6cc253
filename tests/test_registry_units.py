import pytest

from flanneld_py.subnet.registry import EtcdTls, _prefix_end, endpoints_use_https, parse_endpoints
from flanneld_py.subnet.store import EtcdAuthError


def test_endpoints_become_grpc_targets():
    assert parse_endpoints("http://198.51.100.254:2379, https://etcd.example:2381,10.0.0.1") == [
        "198.51.100.254:2379", "etcd.example:2381", "10.0.0.1:2379"]
    with pytest.raises(ValueError):
        parse_endpoints(" , ")


def test_https_endpoints_turn_tls_on_without_files():
    assert endpoints_use_https("http://a:2379,HTTPS://b:2379")
    assert not endpoints_use_https("http://a:2379,b:2379")
    assert EtcdTls(https=True).enabled and not EtcdTls().enabled
    assert EtcdTls(cafile="/etc/ca.pem").enabled


def test_prefix_range_ends_after_every_key_under_the_prefix():
    assert _prefix_end(b"/coreos.com/network/subnets/") == b"/coreos.com/network/subnets0"
    assert _prefix_end(b"a\xff") == b"b"
    assert _prefix_end(b"\xff\xff") == b"\0"  # every key from there on


def test_tls_context_needs_the_certificate_with_its_key():
    with pytest.raises(EtcdAuthError, match="--etcd-certfile and --etcd-keyfile go together"):
        EtcdTls(certfile="/etc/cert.pem").ssl_context()
    with pytest.raises(EtcdAuthError, match="go together"):
        EtcdTls(keyfile="/etc/key.pem").credentials()


def test_tls_failures_name_the_flag_to_fix():
    tls = EtcdTls(cafile="/etc/ca.pem")
    assert "--etcd-cafile=/etc/ca.pem" in tls.cannot_verify("a:2379", "self-signed")
    assert "requires a client certificate" in tls.refused_by_server("a:2379", "alert")
    with_cert = EtcdTls(cafile="/etc/ca.pem", certfile="/etc/c.pem", keyfile="/etc/k.pem")
    assert "does not accept --etcd-certfile=/etc/c.pem" in with_cert.refused_by_server("a:2379", "bad certificate")
