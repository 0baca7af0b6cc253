import asyncio

import pytest

from flanneld_py.subnet.registry import EtcdTls, _prefix_end, diagnose_tls, endpoints_use_https, parse_endpoints
from flanneld_py.subnet.store import EtcdAuthError


def test_endpoints_become_grpc_targets():
    assert parse_endpoints("http://198.51.100.254:2379, https://etcd.example:2381,10.0.0.1") == [
        "198.51.100.254:2379", "etcd.example:2381", "10.0.0.1:2379"]
    assert parse_endpoints("http://[2001:db8::fe]:2379,[2001:db8::fd]") == ["[2001:db8::fe]:2379", "[2001:db8::fd]:2379"]
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


def test_tls_diagnosis_of_a_server_that_does_not_speak_tls_or_is_down():
    async def body() -> tuple[str | None, str | None]:
        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            not_tls = await diagnose_tls(EtcdTls(https=True), f"127.0.0.1:{port}")
        finally:
            server.close()
            await server.wait_closed()
        down = await diagnose_tls(EtcdTls(https=True), f"127.0.0.1:{port}")  # nobody listens now
        return not_tls, down

    not_tls, down = asyncio.run(body())
    assert not_tls is not None and not_tls.startswith("TLS with etcd at 127.0.0.1:") and "serve TLS" in not_tls
    assert "client certificate" not in not_tls
    assert down is None, "an unreachable member is an outage, not a TLS problem"
