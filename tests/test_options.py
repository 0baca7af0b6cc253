"""flanneld's command line as Go's flag package reads it, plus FLANNELD_* variables."""

import logging

import pytest

from flanneld_py.options import (
    FLAGS,
    KLOG_FLAGS,
    UNSUPPORTED_FLAGS,
    HelpRequested,
    UsageError,
    VersionRequested,
    go_bool,
    go_int,
    parse_duration,
    parse_options,
    read_command_line,
    usage_text,
)

# flanneld v0.20.2 --help, every flag (the shared binary's list)
FLANNELD_V0_20_2_FLAGS = {
    "etcd-cafile", "etcd-certfile", "etcd-endpoints", "etcd-keyfile", "etcd-password", "etcd-prefix",
    "etcd-username", "healthz-ip", "healthz-port", "iface", "iface-can-reach", "iface-regex", "ip-masq",
    "iptables-forward-rules", "iptables-resync", "kube-annotation-prefix", "kube-api-url", "kube-subnet-mgr",
    "kubeconfig-file", "log_backtrace_at", "net-config-path", "public-ip", "public-ipv6",
    "set-node-network-unavailable", "subnet-file", "subnet-lease-renew-margin", "v", "version", "vmodule",
}


def read(argv, env=None):
    return read_command_line(argv, env or {})


def test_defaults_match_flanneld():
    o = parse_options([], environ={})
    assert o.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert o.etcd_prefix == "/coreos.com/network"
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.subnet_lease_renew_margin == 60
    assert o.subnet_lease_ttl == 24 * 3600
    assert o.ip_masq is False and o.healthz_port == 0 and o.healthz_ip == "0.0.0.0"
    assert o.iptables_forward_rules is True and o.iptables_resync == 5
    assert o.iface == () and o.iface_regex == () and o.iface_can_reach is None and o.public_ip is None
    assert o.cleanup_on_exit is False and o.offload is True and o.verbosity == 0


def test_every_flanneld_flag_is_known():
    known = {f.name for f in FLAGS} | set(UNSUPPORTED_FLAGS) | set(KLOG_FLAGS) | {"version"}
    assert FLANNELD_V0_20_2_FLAGS <= known


@pytest.mark.parametrize("argv", [
    ["-etcd-endpoints=http://192.0.2.1:2379"], ["--etcd-endpoints=http://192.0.2.1:2379"],
    ["-etcd-endpoints", "http://192.0.2.1:2379"], ["--etcd-endpoints", "http://192.0.2.1:2379"],
])
def test_one_or_two_dashes_equals_or_space(argv):
    assert read(argv)[0].etcd_endpoints == "http://192.0.2.1:2379"


def test_bool_flags_follow_go():
    assert read(["-ip-masq"])[0].ip_masq is True
    assert read(["--ip-masq=true"])[0].ip_masq is True
    assert read(["-ip-masq=false"])[0].ip_masq is False
    assert read(["-iptables-forward-rules=false"])[0].iptables_forward_rules is False
    assert read(["--iptables-forward-rules=0"])[0].iptables_forward_rules is False
    assert read(["-ip-masq=T", "-offload=F"])[0].offload is False


def test_a_bool_flag_does_not_take_the_next_argument():
    with pytest.raises(UsageError, match=r"after -ip-masq.*-ip-masq=false"):
        read(["-ip-masq", "false"])


def test_a_value_flag_takes_the_next_argument_whatever_it_is():
    assert read(["--iface", "--weird"])[0].iface == ("--weird",)


def test_iface_and_regex_repeat_in_order():
    o = read(["-iface=eth9", "--iface", "192.0.2.1", "-iface-regex=^ens", "--iface-regex", "10\\.0\\..*"])[0]
    assert o.iface == ("eth9", "192.0.2.1") and o.iface_regex == ("^ens", "10\\.0\\..*")


def test_new_flannel_flags():
    o = read(["--iface-can-reach=192.0.2.9", "--iptables-resync=30", "--public-ip=198.51.100.7"])[0]
    assert o.iface_can_reach == "192.0.2.9" and o.iptables_resync == 30 and o.public_ip == "198.51.100.7"


def test_go_integers():
    assert go_int("0x10") == 16 and go_int("010") == 8 and go_int("-3") == -3 and go_int("0") == 0
    with pytest.raises(ValueError):
        go_int("ten")
    assert read(["-subnet-lease-renew-margin=0x10"])[0].subnet_lease_renew_margin == 16


def test_go_bools():
    for text in ("1", "t", "T", "TRUE", "true", "True"):
        assert go_bool(text) is True
    for text in ("0", "f", "F", "FALSE", "false", "False"):
        assert go_bool(text) is False
    with pytest.raises(ValueError):
        go_bool("")


def test_env_vars_apply_unless_given_on_the_command_line():
    env = {"FLANNELD_ETCD_ENDPOINTS": "http://198.51.100.254:2379", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_SUBNET_LEASE_TTL": "5s", "FLANNELD_IFACE": "eth1", "FLANNELD_IPTABLES_FORWARD_RULES": "false",
           "FLANNELD_IFACE_REGEX": "^en", "FLANNELD_V": "2"}
    o = read(["--iface=eth0", "-v"], env)[0]
    assert o.etcd_endpoints == "http://198.51.100.254:2379"
    assert o.ip_masq is True and o.subnet_lease_ttl == 5 and o.iface == ("eth0",) and o.verbosity == 1
    assert o.iptables_forward_rules is False and o.iface_regex == ("^en",)
    assert read([], env)[0].iface == ("eth1",) and read([], env)[0].verbosity == 2


def test_an_empty_env_var_is_unset():
    assert read([], {"FLANNELD_ETCD_PREFIX": ""})[0].etcd_prefix == "/coreos.com/network"


def test_unknown_flanneld_env_var_is_named_in_a_warning():
    _, notices = read([], {"FLANNELD_IFACES": "eth0", "FLANNELD_PY_OFFLOAD_IMPL": "numpy", "FLANNELD_V": "0"})
    assert [(n.level, n.message) for n in notices] == [
        (logging.WARNING, "ignoring environment variable FLANNELD_IFACES: there is no flag --ifaces")]


def test_verbosity_forms():
    assert read(["-v=3"])[0].verbosity == 3
    assert read(["-v", "2"])[0].verbosity == 2
    assert read(["--v=4"])[0].verbosity == 4
    assert read(["-v", "-ip-masq"])[0].verbosity == 1


@pytest.mark.parametrize("argv", [
    ["-vmodule=*=1"], ["--vmodule", "main=2"], ["-log_backtrace_at=main.go:1"], ["-logtostderr"],
    ["--alsologtostderr=false"], ["-log_dir=/tmp/x"], ["-stderrthreshold", "INFO"],
])
def test_klog_flags_are_accepted_and_noted_once(argv):
    options, notices = read(argv + ["-ip-masq"])
    assert options.ip_masq is True
    assert len(notices) == 1 and notices[0].level == logging.INFO and "ignoring klog flags" in notices[0].message


@pytest.mark.parametrize("argv, env, word", [
    (["--kube-subnet-mgr"], {}, "--kube-subnet-mgr"),
    (["-kube-subnet-mgr=true"], {}, "-kube-subnet-mgr"),
    (["--kube-api-url=https://192.0.2.1:6443"], {}, "--kube-api-url"),
    (["--kubeconfig-file", "/etc/k"], {}, "--kubeconfig-file"),
    (["--kube-annotation-prefix=x"], {}, "--kube-annotation-prefix"),
    (["--net-config-path=/etc/kube-flannel/net-conf.json"], {}, "--net-config-path"),
    (["--set-node-network-unavailable"], {}, "--set-node-network-unavailable"),
    ([], {"FLANNELD_KUBE_SUBNET_MGR": "true"}, "FLANNELD_KUBE_SUBNET_MGR"),
])
def test_unsupported_flags_name_the_flag_and_the_way_out(argv, env, word):
    with pytest.raises(UsageError) as info:
        read(argv, env)
    assert str(info.value).startswith(word) and "\n" not in str(info.value)
    assert "etcd" in str(info.value) or "IPv4" in str(info.value)


def test_unsupported_flags_set_to_what_we_do_are_fine():
    assert read(["-kube-subnet-mgr=false"])[0].ip_masq is False


def test_public_ipv6_is_a_flag_taking_an_ipv6_address():
    assert read(["--public-ipv6=2001:db8::7"])[0].public_ipv6 == "2001:db8::7"
    assert read([], {"FLANNELD_PUBLIC_IPV6": "2001:db8::8"})[0].public_ipv6 == "2001:db8::8"
    assert read(["--public-ipv6="])[0].public_ipv6 == ""  # empty: the interface's address
    for bad in ("192.0.2.1", "nonsense"):
        with pytest.raises(UsageError, match="--public-ipv6"):
            read([f"--public-ipv6={bad}"])


@pytest.mark.parametrize("argv", [
    ["--bogus"], ["--healthz-port=99999"], ["--subnet-lease-ttl=forever"], ["--etcd-username=a"],
    ["--ip-masq=maybe"], ["--subnet-lease-renew-margin=0"], ["--subnet-lease-renew-margin=1440"],
    ["--iptables-resync=0"], ["--iface-regex=("], ["--public-ip=nonsense"], ["--public-ip=2001:db8::1"],
    ["--iface-can-reach=eth0"], ["--iface"], ["stray"], ["---x"], ["-=x"], ["--", "x"],
])
def test_bad_usage_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_options(argv, environ={})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flanneld-py: ")


def test_bad_env_value_names_the_variable(capsys):
    with pytest.raises(SystemExit):
        parse_options([], environ={"FLANNELD_HEALTHZ_PORT": "eighty"})
    assert "FLANNELD_HEALTHZ_PORT" in capsys.readouterr().err


def test_renew_margin_bounds():
    assert read(["--subnet-lease-renew-margin=1"])[0].subnet_lease_renew_margin == 1
    assert read(["--subnet-lease-renew-margin=1439"])[0].subnet_lease_renew_margin == 1439


def test_help_and_version():
    for argv in (["-h"], ["-help"], ["--help"]):
        with pytest.raises(HelpRequested):
            read(argv)
    for argv in (["-version"], ["--version"]):
        with pytest.raises(VersionRequested):
            read(argv)
    assert read(["-version=false"])[0].ip_masq is False
    text = usage_text()
    for flag in FLAGS:
        assert f"-{flag.name}" in text and flag.env in text
    for name in (*UNSUPPORTED_FLAGS, *KLOG_FLAGS):
        assert f"-{name}" in text


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        parse_options(["--help"], environ={})
    assert info.value.code == 0 and "FLANNELD_IFACE" in capsys.readouterr().out


def test_durations():
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration("7") == 7


def test_newer_flanneld_flags():
    assert read(["--ip-masq-fully-random-disable"])[0].ip_masq_fully_random_disable is True
    assert read([])[0].ip_masq_fully_random_disable is False
    with pytest.raises(UsageError, match="ip-blackhole-route"):
        read(["--ip-blackhole-route"])
