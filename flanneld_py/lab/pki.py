"""A throwaway PKI for a TLS etcd in the lab, made with the ``openssl`` CLI (short-lived EC keys)."""

from __future__ import annotations

import os

from .netns import run

__all__ = ["make_pki"]


def _openssl(*args: str, cwd: str) -> None:
    run(["openssl", *args], cwd=cwd)


def make_pki(directory: str, server_ip: str) -> dict[str, str]:
    """Files ``<name>.crt`` and ``<name>.key`` in ``directory``, as {name: path without suffix}:
    ca, other (a second CA), server (etcd's, for ``server_ip``), client (by ca), rogue (by other)."""
    def key_and_csr(name: str) -> None:
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)

    os.makedirs(directory, exist_ok=True)
    for ca in ("ca", "other"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=flanneld-test-{ca}",
                 cwd=directory)
    leaves = {
        "server": ("ca", f"subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        "client": ("ca", "extendedKeyUsage=clientAuth\n"),
        "rogue": ("other", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (ca, ext) in leaves.items():
        key_and_csr(name)
        with open(os.path.join(directory, f"{name}.ext"), "w") as handle:
            handle.write(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    return {name: os.path.join(directory, name) for name in ("ca", "other", "server", "client", "rogue")}
