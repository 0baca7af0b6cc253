"""Secure etcd: TLS with client-certificate authentication, end to end.

The test makes its own PKI with the ``openssl`` CLI (a CA, etcd's server
certificate, a client certificate, and a second CA with a certificate of its
own), runs etcd with ``--client-cert-auth`` in the lab, and checks that the
daemon works with ``--etcd-cafile/--etcd-certfile/--etcd-keyfile`` and that
every wrong setting ends it quickly with exit 1 and a message naming the flag
and file to fix, never a hang or a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time

import pytest

from flanneld_py.lab.cluster import ETCD_HOST, PREFIX, Cluster
from flanneld_py.lab.etcd import EtcdMember
from flanneld_py.lab.pki import make_pki as lab_pki

from flanneld_py.lab.checks import time_until
from lab_helpers import dump, reachable, start

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI (Debian: openssl)"),
]

FAIL_WITHIN = 10.0  # seconds from start to a clear exit


def make_pki(directory: str) -> dict[str, str]:
    """ca, other (a second CA), server (for ETCD_HOST), client (by ca), rogue (by other): .crt and .key each."""
    return lab_pki(directory, ETCD_HOST)


def test_tls_etcd_with_client_certificates_and_clear_errors():
    with tempfile.TemporaryDirectory(prefix="flanneld-pki-") as pki_dir, \
            Cluster(nodes=2, start_etcd=False) as lab:
        pki = make_pki(pki_dir)
        ctl_tls = {"cacert": f"{pki['ca']}.crt", "cert": f"{pki['client']}.crt", "key": f"{pki['client']}.key"}
        etcd = EtcdMember("tls", ETCD_HOST, lab.workdir, netns=lab.switch, scheme="https", tls_args=[
            f"--cert-file={pki['server']}.crt", f"--key-file={pki['server']}.key",
            "--client-cert-auth", f"--trusted-ca-file={pki['ca']}.crt",
        ])
        lab.etcd = etcd  # the lab stops it on the way out
        etcd.start(wait=False)
        etcd.wait_ready(tls=ctl_tls)
        etcd.ctl("put", f"{PREFIX}/config", json.dumps(lab.config), tls=ctl_tls)
        # etcd really insists on a client certificate
        bare = etcd.ctl("get", f"{PREFIX}/config", check=False, tls={"cacert": ctl_tls["cacert"]})
        assert bare.returncode != 0

        endpoint = f"--etcd-endpoints=https://{ETCD_HOST}:2379"

        def flags(ca: str | None, cert: str | None) -> list[str]:
            out = [endpoint]
            if ca:
                out.append(f"--etcd-cafile={ca}")
            if cert:
                out += [f"--etcd-certfile={cert}.crt", f"--etcd-keyfile={cert}.key"]
            return out

        n1, n2 = lab.nodes
        start(lab, *lab.nodes, extra=flags(f"{pki['ca']}.crt", pki["client"]))
        leases = json.loads(etcd.ctl("get", "--prefix", f"{PREFIX}/subnets/", "-w", "json", tls=ctl_tls).stdout)
        assert len(leases.get("kvs", [])) == 2
        a, b = lab.add_pod(n1), lab.add_pod(n2)
        assert time_until(lambda: reachable(a, b), 10) is not None, dump(lab)
        lab.stop_daemon(n2)

        wrong = {
            "wrong CA": (flags(f"{pki['other']}.crt", pki["client"]),
                         [f"--etcd-cafile={pki['other']}.crt", "cannot verify the certificate of etcd"]),
            "certificate of another CA": (flags(f"{pki['ca']}.crt", pki["rogue"]),
                                          [f"--etcd-certfile={pki['rogue']}.crt", "does not accept"]),
            "no client certificate": (flags(f"{pki['ca']}.crt", None),
                                      ["requires a client certificate", "--etcd-certfile"]),
            "missing CA file": (flags(f"{pki_dir}/nope.crt", pki["client"]),
                                [f"cannot read --etcd-cafile {pki_dir}/nope.crt"]),
            "certificate without its key": ([endpoint, f"--etcd-cafile={pki['ca']}.crt",
                                             f"--etcd-certfile={pki['client']}.crt"],
                                            ["--etcd-certfile and --etcd-keyfile go together"]),
        }
        timings = {}
        for case, (args, needles) in wrong.items():
            with open(n2.log_path, "w"):
                pass  # a fresh log per case
            t0 = time.monotonic()
            lab.start_daemon(n2, *args, wait=False)
            assert n2.daemon is not None
            try:
                code = n2.daemon.wait(timeout=FAIL_WITHIN)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{case}: the daemon still runs after {FAIL_WITHIN}s:\n{n2.log_text()[-3000:]}")
            timings[case] = time.monotonic() - t0
            log = n2.log_text()
            assert code == 1, f"{case}: exit {code}\n{log}"
            assert "Traceback" not in log, f"{case}:\n{log}"
            errors = [line for line in log.splitlines() if " ERROR " in line]
            assert errors and all(needle in errors[-1] for needle in needles), f"{case}: {errors}\n{log[-2000:]}"
            n2.daemon = None
        assert lab.nodes[0].daemon is not None and lab.nodes[0].daemon.poll() is None
        print("\nFIGURE tls: client-cert TLS works; " + ", ".join(
            f"{case}: exit 1 in {took:.1f}s" for case, took in timings.items()))
