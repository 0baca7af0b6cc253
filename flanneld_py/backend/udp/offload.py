"""The offload stages the hot loop calls, from the compiled build when there is one.

Two builds compute the same results and bytes: ``_offload`` (C, built with
the package when a compiler is at hand: one call per stage) and
:mod:`.offload_python` (the reference that states the rules, which the tests
hold the C build to; the daemon's fallback where C was not built).
``FLANNELD_PY_OFFLOAD_IMPL`` chooses: ``c`` (fail if not built), ``python``,
or unset/``auto`` (C if built, else Python).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = [
    "IMPL",
    "complete_checksum",
    "extend_tcp4",
    "extend_tcp6",
    "load",
    "merge_tcp4",
    "merge_tcp6",
    "plain_ipv4_batch",
    "segment_tcp4",
    "segment_tcp6",
    "tcp_flow_run",
]

IMPL_VARIABLE = "FLANNELD_PY_OFFLOAD_IMPL"
_MODULES = {"c": "._offload", "python": ".offload_python"}


def load(choice: str | None = None) -> tuple[str, ModuleType]:
    """The build to use: ``(name, module)``; ``choice`` defaults to the environment's.

    Raises:
        ValueError: an unknown choice, or ``c`` asked for and not built (the daemon
            reports either as a fatal configuration error).
    """
    choice = (choice if choice is not None else os.environ.get(IMPL_VARIABLE, "")).strip().lower() or "auto"
    if choice not in ("auto", *_MODULES):
        raise ValueError(f"{IMPL_VARIABLE}={choice!r}: choose auto, c or python")
    if choice in ("auto", "c"):
        try:
            return "c", importlib.import_module(_MODULES["c"], __package__)
        except ImportError:
            if choice == "c":
                raise ValueError(f"{IMPL_VARIABLE}=c but the compiled offload stages were not built: install "
                                 "gcc and the Python headers, then reinstall flanneld-py") from None
    return "python", importlib.import_module(_MODULES["python"], __package__)


IMPL, _impl = load()
segment_tcp4 = _impl.segment_tcp4
tcp_flow_run = _impl.tcp_flow_run
merge_tcp4 = _impl.merge_tcp4
extend_tcp4 = _impl.extend_tcp4
plain_ipv4_batch = _impl.plain_ipv4_batch
complete_checksum = _impl.complete_checksum
segment_tcp6 = _impl.segment_tcp6
merge_tcp6 = _impl.merge_tcp6
extend_tcp6 = _impl.extend_tcp6
