"""Log lines: time stamps in a terminal, priority prefixes (no time stamps) on the journal stream."""

from __future__ import annotations

import io
import logging
import os

import pytest

from flanneld_py.logs import JournalFormatter, TerminalFormatter, journal_attached, setup_logging, syslog_priority


def record(level: int, name: str = "flanneld_py.backend.udp.backend", msg: str = "peer added: x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_terminal_line_has_time_level_and_short_name():
    line = TerminalFormatter().format(record(logging.INFO))
    date, clock, rest = line.split(" ", 2)
    assert len(date) == 10 and ":" in clock
    assert rest == "INFO backend.udp.backend: peer added: x"


def test_journal_line_has_priority_and_no_time():
    assert JournalFormatter().format(record(logging.WARNING, "flanneld_py", "lost etcd")) == (
        "<4>WARNING flanneld: lost etcd"
    )
    assert JournalFormatter().format(record(logging.INFO, "grpc")).startswith("<6>INFO grpc: ")


def test_every_traceback_line_keeps_the_priority():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = logging.LogRecord("flanneld_py", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = JournalFormatter().format(rec).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)


@pytest.mark.parametrize("level, priority", [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
])
def test_priorities(level, priority):
    assert syslog_priority(level) == priority


def test_journal_stream_must_be_our_stderr(tmp_path):
    with open(tmp_path / "log", "w") as stream:
        info = os.fstat(stream.fileno())
        assert journal_attached({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)
        assert not journal_attached({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream)
        assert not journal_attached({"JOURNAL_STREAM": "garbage"}, stream)
        assert not journal_attached({}, stream)
    assert not journal_attached({"JOURNAL_STREAM": "1:2"}, io.StringIO())


def test_setup_logging_picks_the_format(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with open(tmp_path / "log", "w") as stream:
            info = os.fstat(stream.fileno())
            setup_logging(0, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)
            assert isinstance(root.handlers[0].formatter, JournalFormatter) and root.level == logging.INFO
            setup_logging(1, {}, stream)
            assert isinstance(root.handlers[0].formatter, TerminalFormatter) and root.level == logging.DEBUG
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
