"""How the lab finds flannel's binaries: a named one, else unpacked from ../shared/flannel, else a
one-line reason to skip."""

from __future__ import annotations

import lzma
import os
from pathlib import Path

import pytest

from flanneld_py.lab import flannel
from flanneld_py.lab.flannel import FLANNELD_ENV, FlannelMissing, flanneld_binary


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "shared" / "flannel"
    folder.mkdir(parents=True)
    monkeypatch.setattr(flannel, "SHARED", folder)
    monkeypatch.delenv(FLANNELD_ENV, raising=False)
    return folder


def test_unpacks_the_shared_xz_once_into_an_executable(shared: Path, tmp_path: Path) -> None:
    (shared / flannel.FLANNELD_XZ).write_bytes(lzma.compress(b"#!/bin/sh\necho v0.20.2\n"))
    dest = tmp_path / "bin"
    path = flanneld_binary(str(dest))
    assert Path(path).read_bytes() == b"#!/bin/sh\necho v0.20.2\n" and os.access(path, os.X_OK)
    assert sorted(p.name for p in dest.iterdir()) == ["flanneld"]  # no partial file left
    mtime = os.stat(path).st_mtime_ns
    assert flanneld_binary(str(dest)) == path and os.stat(path).st_mtime_ns == mtime


def test_a_named_binary_wins_and_must_be_executable(shared: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    named = tmp_path / "my-flanneld"
    named.write_text("#!/bin/sh\n")
    monkeypatch.setenv(FLANNELD_ENV, str(named))
    with pytest.raises(FlannelMissing, match=f"{FLANNELD_ENV}=.*not an executable"):
        flanneld_binary(str(tmp_path / "bin"))
    named.chmod(0o755)
    assert flanneld_binary(str(tmp_path / "bin")) == str(named)


def test_neither_gives_one_line_naming_both(shared: Path, tmp_path: Path) -> None:
    with pytest.raises(FlannelMissing) as caught:
        flanneld_binary(str(tmp_path / "bin"))
    message = str(caught.value)
    assert "\n" not in message and flannel.FLANNELD_XZ in message and FLANNELD_ENV in message
