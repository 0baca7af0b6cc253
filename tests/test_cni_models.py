"""The CNI protocol as data: request validation, error codes and result rendering per version."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

import pytest

from flanneld_py.cni.masq import chain_name
from flanneld_py.cni.models import (SUPPORTED_VERSIONS, Attachment, CniError, ConfigDefaults, ErrorCode, Interface,
                                    IPConfig, NetConf, Result, Route, parse_cni_args, parse_request, valid_ifname,
                                    version_info)
from flanneld_py.cni.wiring import HOST_VETH, host_veth_name
from flanneld_py.install import data_file

DEFAULTS = ConfigDefaults(subnet_file="/run/test/subnet.env", data_dir="/var/lib/test")
CONFLIST = data_file("10-flannel-py.conflist")


def wire(command: str = "ADD", env: dict[str, str] | None = None, **config: Any) -> dict[str, Any]:
    conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel-py", **config}
    base = {"CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/pod", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin"}
    return {"command": command, "env": {**base, **(env or {})}, "config": conf}


def code_of(wire_request: Any) -> int:
    with pytest.raises(CniError) as caught:
        parse_request(wire_request, DEFAULTS)
    return caught.value.code


# --- requests --------------------------------------------------------------


def test_a_full_add_request_parses_with_defaults() -> None:
    request = parse_request(wire(env={"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web"}), DEFAULTS)
    assert request.command == "ADD" and request.attachment == Attachment("abc123", "eth0")
    assert request.netns == "/var/run/netns/pod"
    assert request.args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}
    conf = request.config
    assert (conf.bridge, conf.subnet_file, conf.data_dir) == ("cni0", "/run/test/subnet.env", "/var/lib/test")
    assert conf.ip_masq is None and conf.is_default_gateway is False and conf.prev_result is None
    assert conf.gso_max_size is None  # no gsoMaxSize: the kernel's default GSO size on the veths


def test_config_keys_override_defaults() -> None:
    conf = parse_request(wire(bridge="br9", subnetFile="/x/s.env", dataDir="/x/d", isDefaultGateway=True,
                              hairpinMode=True, ipMasq=False, gsoMaxSize=63000, dns={"nameservers": ["1.1.1.1"]}),
                         DEFAULTS).config
    assert (conf.bridge, conf.subnet_file, conf.data_dir) == ("br9", "/x/s.env", "/x/d")
    assert conf.is_default_gateway and conf.hairpin_mode and conf.ip_masq is False
    assert conf.gso_max_size == 63000 and conf.dns == {"nameservers": ["1.1.1.1"]}


@pytest.mark.parametrize(("request_", "code"), [
    (wire(cniVersion="0.2.0"), ErrorCode.INCOMPATIBLE_VERSION),
    (wire(cniVersion="2.0.0"), ErrorCode.INCOMPATIBLE_VERSION),
    (wire(cniVersion=None), ErrorCode.INVALID_CONFIG),
    (wire(name="../../etc"), ErrorCode.INVALID_CONFIG),
    (wire(name=None), ErrorCode.INVALID_CONFIG),
    (wire(hairpinMode="yes"), ErrorCode.INVALID_CONFIG),
    (wire(dataDir="relative/path"), ErrorCode.INVALID_CONFIG),
    (wire(bridge="a-name-far-too-long"), ErrorCode.INVALID_CONFIG),
    (wire(gsoMaxSize=0), ErrorCode.INVALID_CONFIG),
    (wire(dns=["8.8.8.8"]), ErrorCode.INVALID_CONFIG),
    (wire("ATTACH"), ErrorCode.INVALID_ENVIRONMENT),
    (wire(env={"CNI_CONTAINERID": ""}), ErrorCode.INVALID_ENVIRONMENT),
    (wire(env={"CNI_NETNS": ""}), ErrorCode.INVALID_ENVIRONMENT),
    (wire(env={"CNI_NETNS": "relative"}), ErrorCode.INVALID_ENVIRONMENT),
    (wire(env={"CNI_IFNAME": "eth0/../x"}), ErrorCode.INVALID_ENVIRONMENT),
    (wire(env={"CNI_CONTAINERID": "a b"}), ErrorCode.INVALID_ENVIRONMENT),
    (wire("CHECK", cniVersion="0.3.1", prevResult={}), ErrorCode.INCOMPATIBLE_VERSION),
    (wire("CHECK"), ErrorCode.INVALID_CONFIG),
    (wire("STATUS", cniVersion="1.0.0"), ErrorCode.INCOMPATIBLE_VERSION),
    (wire("GC", cniVersion="1.0.0"), ErrorCode.INCOMPATIBLE_VERSION),
    (wire("GC", cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": 1}]}),
     ErrorCode.INVALID_CONFIG),
    ({"command": "ADD"}, ErrorCode.DECODE_FAILURE),
    ([], ErrorCode.DECODE_FAILURE),
    ({"command": "ADD", "env": {}, "config": "nope"}, ErrorCode.INVALID_CONFIG),
])
def test_bad_requests_get_the_spec_codes(request_: Any, code: int) -> None:
    assert code_of(request_) == code


def test_del_needs_no_netns_and_status_no_container() -> None:
    assert parse_request(wire("DEL", env={"CNI_NETNS": ""}), DEFAULTS).netns == ""
    status = parse_request(wire("STATUS", cniVersion="1.1.0", env={"CNI_CONTAINERID": "", "CNI_IFNAME": ""}),
                           DEFAULTS)
    assert status.command == "STATUS"


def test_gc_reads_valid_attachments() -> None:
    valid = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    conf = parse_request(wire("GC", cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid}), DEFAULTS).config
    assert conf.valid_attachments == (Attachment("a", "eth0"), Attachment("b", "net1"))


def test_error_messages_name_what_is_wrong() -> None:
    with pytest.raises(CniError, match="CNI_CONTAINERID, CNI_IFNAME"):
        parse_request(wire(env={"CNI_CONTAINERID": "", "CNI_IFNAME": ""}), DEFAULTS)
    with pytest.raises(CniError, match="dataDir"):
        parse_request(wire(dataDir=3), DEFAULTS)


@pytest.mark.parametrize(("name", "ok"), [("eth0", True), ("a" * 15, True), ("a" * 16, False), ("", False),
                                          (".", False), ("..", False), ("a:b", False), ("a b", False)])
def test_interface_names(name: str, ok: bool) -> None:
    assert valid_ifname(name) is ok


def test_cni_args() -> None:
    assert parse_cni_args("") == {}
    assert parse_cni_args("A=1;B=;junk;=x;C=a=b") == {"A": "1", "B": "", "C": "a=b"}


# --- errors and results ----------------------------------------------------


def test_errors_render_as_spec_objects() -> None:
    assert CniError(7, "bad", "because").render("1.0.0") == {"cniVersion": "1.0.0", "code": 7, "msg": "bad",
                                                              "details": "because"}
    assert "details" not in CniError(11, "later").render("0.4.0")
    assert ErrorCode.TRY_AGAIN_LATER == 11 and ErrorCode.NOT_AVAILABLE == 50
    assert all(code >= 100 for code in ErrorCode if code.name in
               ("SUBNET_FILE_INVALID", "ADDRESSES_EXHAUSTED", "KERNEL_SETUP_FAILED", "CHECK_MISMATCH"))


RESULT = Result(
    interfaces=(Interface("veth0123456789a", "0a:00:00:00:00:01", mtu=1472),
                Interface("eth0", "0a:00:00:00:00:02", sandbox="/var/run/netns/pod", mtu=1472)),
    ips=(IPConfig(IPv4Interface("10.244.5.2/24"), IPv4Address("10.244.5.1"), interface=1),),
    routes=(Route(IPv4Network("0.0.0.0/0"), IPv4Address("10.244.5.1")),),
    dns={"nameservers": ["10.96.0.10"]},
)


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_legacy_results_tag_ips_with_their_version(version: str) -> None:
    out = RESULT.render(version)
    assert out["cniVersion"] == version
    assert out["ips"] == [{"version": "4", "interface": 1, "address": "10.244.5.2/24", "gateway": "10.244.5.1"}]
    assert out["interfaces"][1] == {"name": "eth0", "mac": "0a:00:00:00:00:02", "sandbox": "/var/run/netns/pod"}
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.5.1"}]
    assert out["dns"] == {"nameservers": ["10.96.0.10"]}


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_1x_results_have_no_ip_version(version: str) -> None:
    out = RESULT.render(version)
    assert out["ips"] == [{"interface": 1, "address": "10.244.5.2/24", "gateway": "10.244.5.1"}]
    assert ("mtu" in out["interfaces"][1]) is (version == "1.1.0")  # interface MTU is a 1.1.0 field


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_results_survive_a_round_trip_as_prev_result(version: str) -> None:
    parsed = Result.parse(json.loads(json.dumps(RESULT.render(version))))
    assert parsed.ips == RESULT.ips and parsed.routes == RESULT.routes
    assert [(i.name, i.mac, i.sandbox) for i in parsed.interfaces] == [
        (i.name, i.mac, i.sandbox) for i in RESULT.interfaces]


DUAL = Result(
    interfaces=RESULT.interfaces,
    ips=(IPConfig(IPv4Interface("10.244.5.2/24"), IPv4Address("10.244.5.1"), interface=1),
         IPConfig(IPv6Interface("fd00:10:244:5::2/64"), IPv6Address("fd00:10:244:5::1"), interface=1)),
    routes=(Route(IPv4Network("10.244.0.0/16"), IPv4Address("10.244.5.1")),
            Route(IPv6Network("fd00:10:244::/56"), IPv6Address("fd00:10:244:5::1")),
            Route(IPv6Network("::/0"), IPv6Address("fd00:10:244:5::1"))),
)


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_legacy_dual_stack_results_tag_each_ip_with_its_family(version: str) -> None:
    out = DUAL.render(version)
    assert out["ips"] == [
        {"version": "4", "interface": 1, "address": "10.244.5.2/24", "gateway": "10.244.5.1"},
        {"version": "6", "interface": 1, "address": "fd00:10:244:5::2/64", "gateway": "fd00:10:244:5::1"},
    ]
    assert out["routes"][1:] == [{"dst": "fd00:10:244::/56", "gw": "fd00:10:244:5::1"},
                                 {"dst": "::/0", "gw": "fd00:10:244:5::1"}]


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_dual_stack_results_survive_a_round_trip(version: str) -> None:
    out = DUAL.render(version)
    if version.startswith("1."):
        assert all("version" not in ip for ip in out["ips"])
    parsed = Result.parse(json.loads(json.dumps(out)))
    assert parsed.ips == DUAL.ips and parsed.routes == DUAL.routes


def test_prev_result_reads_both_families_and_rejects_garbage() -> None:
    parsed = Result.parse({"ips": [{"address": "fd00::2/64"}, {"address": "10.0.0.2/24"}],
                           "routes": [{"dst": "::/0"}]})
    assert [str(ip.address) for ip in parsed.ips] == ["fd00::2/64", "10.0.0.2/24"]
    assert parsed.routes == (Route(IPv6Network("::/0")),)
    for garbage in ({"ips": [{"address": "not-an-ip"}]}, {"routes": [{"dst": "fd00::1/64"}]}):
        with pytest.raises(CniError) as caught:
            Result.parse(garbage)
        assert caught.value.code == ErrorCode.INVALID_CONFIG


def test_version_answers_in_the_version_asked_for() -> None:
    assert version_info("0.4.0") == {"cniVersion": "0.4.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert version_info("9.9.9")["cniVersion"] == "1.1.0"
    assert version_info(None)["cniVersion"] == "1.1.0"


# --- names derived from an attachment --------------------------------------


def test_host_veth_names_are_stable_short_and_distinct() -> None:
    a, b = Attachment("ctr-1", "eth0"), Attachment("ctr-1", "net1")
    assert host_veth_name(a) == host_veth_name(Attachment("ctr-1", "eth0"))
    assert host_veth_name(a) != host_veth_name(b)
    assert len(host_veth_name(a)) == 15 and HOST_VETH.match(host_veth_name(a))


def test_masquerade_chain_names_fit_iptables() -> None:
    name = chain_name("cbr0", Attachment("c" * 64, "eth0"))
    assert name.startswith("FLP-") and len(name) == 28
    assert name != chain_name("other", Attachment("c" * 64, "eth0"))


# --- the example conflist --------------------------------------------------


def test_the_example_conflist_is_ours_then_portmap() -> None:
    conflist = json.loads(CONFLIST.read_text())
    assert conflist["cniVersion"] == "1.0.0" and conflist["name"] == "cbr0"
    ours, portmap = conflist["plugins"]
    assert ours["type"] == "flannel-py" and ours["bridge"] == "cni0"
    assert ours["isDefaultGateway"] is True and ours["hairpinMode"] is True
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    conf = NetConf.parse({"cniVersion": conflist["cniVersion"], "name": conflist["name"], **ours}, DEFAULTS)
    assert conf.subnet_file == "/run/flannel/subnet.env" and conf.data_dir == "/var/lib/cni/networks"
