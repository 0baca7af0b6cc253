"""Build this checkout's wheel as an operator does (pip wheel), from a clean copy of the tree.

A copy, because setuptools builds in the source's ``build/`` directory: two builds at once
(tests running in parallel, or a developer's own build) would trip over each other.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """Build the wheel into ``out``; its path."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    with tempfile.TemporaryDirectory(prefix="flanneld-py-src-") as tree:
        for name in filter(None, files):
            source = REPO / name
            if source.is_file():
                target = Path(tree) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                               tree], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (wheel,) = out.glob("flanneld_py-*.whl")
    return wheel
