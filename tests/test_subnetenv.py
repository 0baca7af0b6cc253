import os
from ipaddress import IPv4Network, IPv6Network

import pytest

from flanneld_py.core.subnetenv import PodRange, SubnetEnv, SubnetEnvError
from flanneld_py.subnetfile import previous_env, previous_ipv6_subnet, previous_subnet, write_subnet_file

V4_NETWORK, V4_SUBNET = IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24")
V6_NETWORK, V6_SUBNET = IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244:7::/64")


def test_render_is_flannels_format():
    env = SubnetEnv(V4_NETWORK, V4_SUBNET, 1472, False)
    assert env.render() == (
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )
    assert SubnetEnv.parse(env.render()) == env
    assert env.ranges == (PodRange(V4_NETWORK, V4_SUBNET),)
    assert env.ipv6 is None and env.ipv6_gateway is None


def test_dual_stack_is_flannels_format():
    # flanneld v0.20.2 WriteSubnetFile: IPv4 pair, IPv6 pair, MTU, IPMASQ, in this order
    env = SubnetEnv(V4_NETWORK, V4_SUBNET, 1450, True, V6_NETWORK, V6_SUBNET)
    assert env.render() == (
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    assert SubnetEnv.parse(env.render()) == env
    assert [str(r.gateway) for r in env.ranges] == ["10.244.7.1/24", "fd00:10:244:7::1/64"]


def test_ipv6_only_is_flannels_format():
    env = SubnetEnv(None, None, 1430, False, V6_NETWORK, V6_SUBNET)
    assert env.render() == (
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
        "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
    )
    parsed = SubnetEnv.parse(env.render())
    assert parsed == env
    assert parsed.gateway is None and parsed.ipv4 is None
    assert parsed.ranges == (PodRange(V6_NETWORK, V6_SUBNET),)


def test_parse_errors_name_the_variable():
    with pytest.raises(SubnetEnvError, match="FLANNEL_MTU"):
        SubnetEnv.parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n")
    with pytest.raises(SubnetEnvError, match="FLANNEL_NETWORK='x'"):
        SubnetEnv.parse("FLANNEL_NETWORK=x\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1\n")
    with pytest.raises(SubnetEnvError, match="FLANNEL_IPV6_SUBNET='10.244.7.1/24'"):
        SubnetEnv.parse("FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1\n")
    with pytest.raises(SubnetEnvError, match="FLANNEL_IPV6_NETWORK='fd00::1/56'"):
        SubnetEnv.parse("FLANNEL_IPV6_NETWORK=fd00::1/56\nFLANNEL_IPV6_SUBNET=fd00::1/64\nFLANNEL_MTU=1\n")
    with pytest.raises(SubnetEnvError, match="FLANNEL_MTU='big'"):
        SubnetEnv.parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=big\n")
    with pytest.raises(SubnetEnvError, match="FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET"):
        SubnetEnv.parse("FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_MTU=1\n")
    with pytest.raises(SubnetEnvError, match="FLANNEL_NETWORK and FLANNEL_SUBNET"):
        SubnetEnv.parse("FLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1\n")
    with pytest.raises(SubnetEnvError, match="neither"):
        SubnetEnv.parse("FLANNEL_MTU=1450\n")


def test_atomic_write_and_previous(tmp_path):
    path = tmp_path / "run" / "subnet.env"
    assert previous_subnet(str(path)) is None and previous_ipv6_subnet(str(path)) is None
    env = SubnetEnv(V4_NETWORK, IPv4Network("10.244.9.0/24"), 1450, True)
    write_subnet_file(str(path), env)
    assert previous_subnet(str(path)) == IPv4Network("10.244.9.0/24")
    assert previous_ipv6_subnet(str(path)) is None
    assert os.listdir(path.parent) == ["subnet.env"]  # no temp file left
    assert oct(path.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("v4", [True, False], ids=["dual-stack", "ipv6-only"])
def test_previous_ipv6_subnet(tmp_path, v4):
    path = str(tmp_path / "subnet.env")
    env = SubnetEnv(V4_NETWORK if v4 else None, V4_SUBNET if v4 else None, 1450, False, V6_NETWORK, V6_SUBNET)
    write_subnet_file(path, env)
    assert previous_env(path) == env
    assert previous_ipv6_subnet(path) == V6_SUBNET
    assert previous_subnet(path) == (V4_SUBNET if v4 else None)
