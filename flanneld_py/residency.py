"""What the daemon does about its own resident memory at start-up (kube-flannel limits flannel's
container to 50 MiB): one malloc arena for every thread, and gRPC's library pages that loading it
mapped handed back. Both through libc with ctypes; a libc or kernel without the call is left as is."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

__all__ = ["clean_read_only_spans", "one_malloc_arena", "unmap_clean_pages"]

M_ARENA_MAX = -8  # glibc's mallopt parameter
MADV_RANDOM, MADV_DONTNEED = 1, 4  # madvise(2) advice values


def one_malloc_arena() -> None:
    """Let every thread share glibc's main malloc arena. glibc gives each thread that allocates an
    arena of its own; the daemon's threads (gRPC's, the executor's) allocate little, so their
    arenas only add resident memory. Before any thread starts; a libc without mallopt is left as is."""
    import ctypes  # the CNI wiring, served when this runs, loads it anyway

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def unmap_clean_pages(module_name: str) -> None:
    """Unmap the pages of an extension module's library that loading it mapped, where no page was
    written: code, symbol and relocation tables, constants, unwind tables.

    gRPC's library is large, and the kernel maps a file's pages in blocks around each page touched
    (fault-around, large page-cache folios), so importing grpc leaves megabytes of it resident that
    the daemon never runs or reads again. MADV_RANDOM makes later faults there map single pages;
    MADV_DONTNEED unmaps what is mapped now. The pages stay in the page cache, so one used again
    faults back in from there, without I/O. Mappings that hold a written page (the relocated data
    the loader protects read-only afterwards) are left alone: unmapping would lose those pages.
    """
    import ctypes  # the CNI wiring loads it anyway; without a CNI socket the pages unmapped outweigh it

    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return
    try:
        with open("/proc/self/smaps") as smaps:
            spans = clean_read_only_spans(smaps, os.path.realpath(path))
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start, end in spans:
        for advice in (MADV_RANDOM, MADV_DONTNEED):
            madvise(start, end - start, advice)


def clean_read_only_spans(smaps: Iterable[str], path: str) -> list[tuple[int, int]]:
    """The private read-only or read-execute mappings of ``path`` (lines of ``/proc/PID/smaps``)
    in which no page was written (``Anonymous: 0``): each one's pages are the file's."""
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps:
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's first line: range, perms, offset, device, inode, path
            current = None
            if len(fields) == 6 and fields[1] in ("r--p", "r-xp") and fields[5] == path:
                low, high = fields[0].split("-")
                current = (int(low, 16), int(high, 16))
        elif current is not None and fields[0] == "Anonymous:":
            if fields[1] == "0":
                spans.append(current)
            current = None
    return spans
