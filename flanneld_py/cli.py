"""``flanneld-py``: the daemon, plus the operator subcommands ``status`` and ``trace`` and the
install steps ``install-cni`` and ``install-systemd``."""

from __future__ import annotations

import gc
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

__all__ = ["main"]

SUBCOMMANDS = ("status", "trace", "install-cni", "install-systemd")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return _run_subcommand(args[0], args[1:])
    return _run_daemon(args)


START_WITHOUT_GC = 3.0  # seconds from launch with Python's cyclic collector off (see _collect_after_start)


def _run_daemon(args: list[str]) -> int:
    gc.disable()  # from here, through the imports, until _collect_after_start turns it back on
    try:
        return _start_daemon(args)
    finally:
        gc.enable()  # also after a usage error, for a caller in the same process


def _start_daemon(args: list[str]) -> int:
    from .options import parse_command_line

    options, notices = parse_command_line(args)  # exits 2 on bad usage
    if options.cni_socket:  # without a CNI server, importing ctypes would cost more than it saves
        _one_malloc_arena()

    import logging

    import uvloop

    from .app import Daemon
    from .logs import setup_logging

    setup_logging(options.verbosity)
    for notice in notices:
        logging.getLogger("flanneld_py").log(notice.level, "%s", notice.message)
    return uvloop.run(_collect_after_start(Daemon(options).run()))


async def _collect_after_start(run: Coroutine[Any, Any, int]) -> int:
    """Run ``run`` with the cyclic collector off for its first :data:`START_WITHOUT_GC` seconds.

    Start-up allocates much and frees little (modules, classes, a listing of every lease),
    so the young-generation passes it would trigger traverse survivors for nothing, on the
    way to the first peers in the kernel. The cycles of a slow start (an etcd that does not
    answer yet) wait those few seconds, then the collector takes them as usual.
    """
    import asyncio

    asyncio.get_running_loop().call_later(START_WITHOUT_GC, gc.enable)
    return await run


M_ARENA_MAX = -8  # glibc's mallopt parameter


def _one_malloc_arena() -> None:
    """Let every thread share glibc's main malloc arena. glibc gives each thread that allocates an
    arena of its own; the daemon's threads (gRPC's, the executor's) allocate little, so their
    arenas only add resident memory. Before any thread starts; a libc without mallopt is left as is."""
    import ctypes  # the CNI wiring, served when this runs, loads it anyway

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def _run_subcommand(name: str, args: list[str]) -> int:
    if name == "status":
        from .ops.status import main as status_main

        return status_main(args)
    if name == "install-cni":
        from .install import main_install_cni

        return main_install_cni(args)
    if name == "install-systemd":
        from .install import main_install_systemd

        return main_install_systemd(args)
    from .ops.trace import main as trace_main

    return trace_main(args)


if __name__ == "__main__":
    sys.exit(main())
