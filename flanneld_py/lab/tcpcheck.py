"""A TCP transfer whose both ends print the sha256 of the bytes they moved.

``python3 -m flanneld_py.lab.tcpcheck serve PORT`` accepts one connection (IPv4 or IPv6) and
prints the digest of everything received; ``send HOST PORT NBYTES`` sends
NBYTES of pseudo-random data and prints its digest. Equal digests mean the
overlay delivered every byte intact.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys

CHUNK = 256 * 1024


def serve(port: int, timeout: float = 120.0) -> str:
    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=True) as server:
        server.settimeout(timeout)
        print("listening", flush=True)
        conn, _ = server.accept()
        conn.settimeout(timeout)
        digest = hashlib.sha256()
        total = 0
        with conn:
            while chunk := conn.recv(CHUNK):
                digest.update(chunk)
                total += len(chunk)
    return f"{digest.hexdigest()} {total}"


def send(host: str, port: int, nbytes: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with socket.create_connection((host, port), timeout=30) as conn:
        left = nbytes
        while left:
            chunk = rng.randbytes(min(CHUNK, left))
            conn.sendall(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return f"{digest.hexdigest()} {nbytes}"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        print(serve(int(argv[1])), flush=True)
        return 0
    if len(argv) == 4 and argv[0] == "send":
        print(send(argv[1], int(argv[2]), int(argv[3])), flush=True)
        return 0
    print("usage: tcpcheck serve PORT | send HOST PORT NBYTES", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
