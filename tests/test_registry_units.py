import pytest

from flanneld_py.subnet.registry import EtcdTls, endpoints_use_https, parse_endpoints


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
