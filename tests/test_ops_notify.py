"""sd_notify: message format, socket addresses, watchdog interval, datagrams on a real socket."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import pytest

from flanneld_py.ops.notify import Notifier, format_notify, socket_address, watchdog_interval, watchdog_loop


def test_format_is_key_value_lines():
    assert format_notify({"READY": "1", "STATUS": "running: subnet 10.244.3.0/24"}) == (
        b"READY=1\nSTATUS=running: subnet 10.244.3.0/24\n"
    )


def test_a_value_stays_on_one_line():
    assert format_notify({"STATUS": "lost etcd\nretrying"}) == b"STATUS=lost etcd retrying\n"


@pytest.mark.parametrize("key", ["", "A=B", "TWO WORDS"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError):
        format_notify({key: "1"})


def test_abstract_socket_address():
    assert socket_address("@/org/freedesktop/systemd1/notify") == "\0/org/freedesktop/systemd1/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_watchdog_interval_is_half_the_timeout():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0


@pytest.mark.parametrize("environ", [
    {},
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "soon"},
    {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"},  # meant for another process
])
def test_watchdog_off(environ):
    assert watchdog_interval(environ, pid=7) is None


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send(READY="1") is False


@pytest.fixture
def receiver():
    with tempfile.TemporaryDirectory(prefix="flanneld-notify-") as tmp:
        path = os.path.join(tmp, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield path, sock
        finally:
            sock.close()


def test_datagrams_reach_the_socket(receiver):
    path, sock = receiver
    notifier = Notifier(path)
    notifier.status("waiting for network config")
    notifier.status("waiting for network config")  # unchanged: not resent
    notifier.ready("running: subnet 10.244.3.0/24")
    notifier.ready("running again")  # READY=1 only once
    notifier.watchdog()
    notifier.stopping()
    got = [sock.recv(4096) for _ in range(4)]
    assert got == [
        b"STATUS=waiting for network config\n",
        b"READY=1\nSTATUS=running: subnet 10.244.3.0/24\n",
        b"WATCHDOG=1\n",
        b"STOPPING=1\nSTATUS=stopping\n",
    ]
    sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    asyncio.run(notifier.close())


def test_abstract_socket():
    name = f"flanneld-py-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier("@" + name).send(READY="1")
        assert sock.recv(100) == b"READY=1\n"


def test_unreachable_socket_is_not_an_error(tmp_path):
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.send(STATUS="x") is False
    assert notifier.send(STATUS="y") is False


def test_watchdog_loop_pings_until_cancelled(receiver):
    path, sock = receiver

    async def run() -> None:
        task = asyncio.create_task(watchdog_loop(Notifier(path), 0.01))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30):  # three pings, however slow the machine
            for _ in range(3):
                assert await loop.sock_recv(sock, 100) == b"WATCHDOG=1\n"
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
