"""The daemon's start-up memory measures (flanneld_py/residency.py): which of a library's mappings
may be unmapped, and that unmapping gRPC's gives its pages back while gRPC keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from flanneld_py.residency import clean_read_only_spans

LIB = "/venv/lib/python3.11/site-packages/grpc/_cython/cygrpc.so"

_SMAPS = f"""\
7f0000000000-7f00000c4000 r--p 00000000 fe:00 5334656                    {LIB}
Size:                784 kB
Rss:                 784 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f00000c4000-7f0000c8a000 r-xp 000c4000 fe:00 5334656                    {LIB}
Size:              12056 kB
Rss:                4012 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0000c8a000-7f0000c8b000 ---p 00fe1000 fe:00 5334656                    {LIB}
Anonymous:             0 kB
7f0000c8b000-7f0000cdb000 r--p 00fe1000 fe:00 5334656                    {LIB}
Size:                320 kB
Rss:                 320 kB
Anonymous:           320 kB
7f0000cdb000-7f0000cfe000 rw-p 01031000 fe:00 5334656                    {LIB}
Anonymous:           140 kB
7f0000d00000-7f0000d10000 r--p 00000000 fe:00 5334657                    /usr/lib/libother.so
Anonymous:             0 kB
7f0000e00000-7f0000e10000 r--p 00000000 fe:00 5334656                    {LIB} (deleted)
Anonymous:             0 kB
7f0000f00000-7f0000f21000 rw-p 00000000 00:00 0                          [heap]
Anonymous:           132 kB
"""


def test_only_the_librarys_unwritten_read_only_and_code_mappings_are_chosen() -> None:
    spans = clean_read_only_spans(_SMAPS.splitlines(), LIB)
    # not the relocated read-only data (written pages), the writable data, another file or a replaced one
    assert spans == [(0x7F0000000000, 0x7F00000C4000), (0x7F00000C4000, 0x7F0000C8A000)]


# Import grpc, unmap its library's clean pages, then use gRPC: a call to a port nobody serves must
# fail as gRPC says (UNAVAILABLE), in a process that goes on to exit normally.
_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    import grpc
    from flanneld_py.residency import clean_read_only_spans, unmap_clean_pages

    def resident():
        path = os.path.realpath(grpc._cython.cygrpc.__file__)
        total, current = 0, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if not fields[0].endswith(":"):
                current = fields[-1] == path
            elif current and fields[0] == "Rss:":
                total += int(fields[1])
        return total

    before = resident()
    unmap_clean_pages("grpc._cython.cygrpc")
    after = resident()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/etcdserverpb.KV/Range")
        try:
            call(b"", timeout=5)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    print(json.dumps({"before": before, "after": after, "code": code}))
""")


def test_grpc_works_after_its_clean_pages_are_unmapped() -> None:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["code"] == "UNAVAILABLE"
    assert report["after"] < report["before"] / 2, report  # the unwritten pages left the resident set
