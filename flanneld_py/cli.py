"""``flanneld-py``: the daemon, plus the operator subcommands ``status`` and ``trace`` and the
install steps ``install-cni`` and ``install-systemd``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

SUBCOMMANDS = ("status", "trace", "install-cni", "install-systemd")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return _run_subcommand(args[0], args[1:])
    return _run_daemon(args)


def _run_daemon(args: list[str]) -> int:
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
    return uvloop.run(Daemon(options).run())


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
