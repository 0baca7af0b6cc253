"""The build steps pyproject.toml cannot declare: three compiled parts, both optional.

- ``flanneld_py.backend.udp._offload``, the udp hot loop's offload stages (a C extension);
  without it the daemon runs the NumPy build (backend/udp/offload.py).
- ``flanneld_py.backend.udp._lane``, the udp backend's fast lane (a C thread for lone plain
  forwards); without it every packet takes the Python loop.
- ``flanneld_py/cni/bin/flannel-py``, the CNI shim compiled from ``flanneld_py/cni/shim.c``
  (libc only), shipped as package data for ``flanneld-py install-cni``; without it
  install-cni installs the Python shim (``flanneld_py/cni/shim.py``) and says so.

Where no C compiler works, each is left out with one log line and the package installs anyway.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SHIM_SOURCE = os.path.join("flanneld_py", "cni", "shim.c")
SHIM_TARGET = os.path.join("flanneld_py", "cni", "bin", "flannel-py")
STAGES_HEADER = os.path.join("flanneld_py", "backend", "udp", "offload_stages.h")  # the C stages both extensions share
SHIM_CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=c11"]


class BuildWithShim(build_ext):
    """build_ext, then the CNI shim into the build tree (and the source tree for an editable install)."""

    def run(self) -> None:
        super().run()
        targets = [os.path.join(self.build_lib, SHIM_TARGET)]
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(SHIM_TARGET)
        self._compile_shim(targets)

    def _compile_shim(self, targets: list[str]) -> None:
        compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        if shutil.which(compiler[0]) is None:
            print(f"flanneld-py: no C compiler ({compiler[0]}): the compiled CNI shim is left out; "
                  "install-cni will install the Python shim")
            return
        first, *copies = targets
        os.makedirs(os.path.dirname(first), exist_ok=True)
        proc = subprocess.run([*compiler, *SHIM_CFLAGS, "-o", first, SHIM_SOURCE],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"flanneld-py: the CNI shim did not compile, left out (install-cni will install the "
                  f"Python shim):\n{proc.stderr}")
            return
        for copy in copies:
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            shutil.copy2(first, copy)
        print(f"flanneld-py: compiled the CNI shim {SHIM_SOURCE} -> {SHIM_TARGET}")


setup(
    ext_modules=[
        Extension("flanneld_py.backend.udp._offload", sources=["flanneld_py/backend/udp/_offload.c"],
                  depends=[STAGES_HEADER], extra_compile_args=["-O3"], optional=True),
        Extension("flanneld_py.backend.udp._lane", sources=["flanneld_py/backend/udp/_lane.c"],
                  depends=[STAGES_HEADER], extra_compile_args=["-O3", "-std=gnu11"], optional=True),
    ],
    cmdclass={"build_ext": BuildWithShim},
)
