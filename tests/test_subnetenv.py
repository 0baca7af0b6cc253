import os
from ipaddress import IPv4Network

import pytest

from flanneld_py.core.subnetenv import SubnetEnv, SubnetEnvError
from flanneld_py.subnetfile import previous_subnet, write_subnet_file


def test_render_is_flannels_format():
    env = SubnetEnv(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 1472, False)
    assert env.render() == (
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )
    assert SubnetEnv.parse(env.render()) == env


def test_parse_errors_name_the_variable():
    with pytest.raises(SubnetEnvError, match="FLANNEL_MTU"):
        SubnetEnv.parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n")
    with pytest.raises(SubnetEnvError):
        SubnetEnv.parse("FLANNEL_NETWORK=x\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1\n")


def test_atomic_write_and_previous(tmp_path):
    path = tmp_path / "run" / "subnet.env"
    assert previous_subnet(str(path)) is None
    env = SubnetEnv(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.9.0/24"), 1450, True)
    write_subnet_file(str(path), env)
    assert previous_subnet(str(path)) == IPv4Network("10.244.9.0/24")
    assert os.listdir(path.parent) == ["subnet.env"]  # no temp file left
    assert oct(path.stat().st_mode & 0o777) == "0o644"
