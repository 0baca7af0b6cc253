import pytest

from flanneld_py.options import parse_duration, parse_options


def test_defaults_match_flanneld():
    o = parse_options([], environ={})
    assert o.etcd_prefix == "/coreos.com/network"
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.subnet_lease_renew_margin == 60
    assert o.subnet_lease_ttl == 24 * 3600
    assert o.ip_masq is False and o.healthz_port == 0 and o.cleanup_on_exit is False


def test_env_vars_and_flags():
    env = {"FLANNELD_ETCD_ENDPOINTS": "http://198.51.100.254:2379", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_SUBNET_LEASE_TTL": "5s", "FLANNELD_IFACE": "eth1"}
    o = parse_options(["--iface=eth0", "-v"], environ=env)
    assert o.etcd_endpoints == "http://198.51.100.254:2379"
    assert o.ip_masq is True and o.subnet_lease_ttl == 5 and o.iface == "eth0" and o.verbosity == 1
    assert parse_options(["-v=3"], environ={}).verbosity == 3
    assert parse_options(["--ip-masq"], environ={}).ip_masq is True


@pytest.mark.parametrize("argv", [["--bogus"], ["--healthz-port=99999"], ["--subnet-lease-ttl=forever"],
                                  ["--etcd-username=a"], ["--ip-masq=maybe"]])
def test_bad_usage_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_options(argv, environ={})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flanneld-py: ")


def test_durations():
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration("7") == 7
