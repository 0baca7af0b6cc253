"""A small iptables runner: idempotent chains and rules, always with ``--wait``.

Shared by the CNI side (per-pod masquerade) and the daemon's ``--ip-masq``
(FLANNEL-POSTRTG). It runs the ``iptables`` binary of the namespace the
process is in, so the binary decides between nft and legacy as on the rest
of the host. Rules are argument lists, exactly as after ``-A <chain>``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["Iptables", "IptablesError"]

Rule = Sequence[str]


class IptablesError(RuntimeError):
    """iptables refused a command; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class Iptables:
    """``prefix`` runs the binary through a wrapper, e.g. ``("ip", "netns", "exec", "lab")``."""

    binary: str = "iptables"
    wait_seconds: int = 5
    timeout: float = 30.0
    prefix: tuple[str, ...] = ()

    def for_ipv6(self) -> Iptables:
        """The same runner for ``ip6tables`` (and ``ip6tables-restore``)."""
        return replace(self, binary=self.binary.replace("iptables", "ip6tables", 1))

    def _run(self, table: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self.prefix, self.binary, "--wait", str(self.wait_seconds), "-t", table, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IptablesError(f"{' '.join(argv)}: {exc}") from exc
        if check and proc.returncode != 0:
            raise IptablesError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # --- chains ------------------------------------------------------------

    def chain_exists(self, table: str, chain: str) -> bool:
        return self._run(table, "-n", "-L", chain, check=False).returncode == 0

    def ensure_chain(self, table: str, chain: str) -> None:
        """Create ``chain`` unless it exists (its rules are left as they are)."""
        proc = self._run(table, "-N", chain, check=False)
        if proc.returncode != 0 and not self.chain_exists(table, chain):
            raise IptablesError(f"cannot create chain {chain} in table {table}: {proc.stderr.strip()}")

    def flush_chain(self, table: str, chain: str) -> None:
        self._run(table, "-F", chain)

    def delete_chain(self, table: str, chain: str) -> bool:
        """Flush and remove ``chain``; False if it did not exist. Jumps to it must be gone first."""
        if not self.chain_exists(table, chain):
            return False
        self._run(table, "-F", chain)
        self._run(table, "-X", chain)
        return True

    # --- rules -------------------------------------------------------------

    def rule_exists(self, table: str, chain: str, rule: Rule) -> bool:
        return self._run(table, "-C", chain, *rule, check=False).returncode == 0

    def ensure_rule(self, table: str, chain: str, rule: Rule) -> bool:
        """Append ``rule`` unless present (``-C`` then ``-A``); True if it was added."""
        if self.rule_exists(table, chain, rule):
            return False
        self._run(table, "-A", chain, *rule)
        return True

    def delete_rule(self, table: str, chain: str, rule: Rule) -> bool:
        """Remove ``rule``; False if it was not there."""
        if not self.rule_exists(table, chain, rule):
            return False
        self._run(table, "-D", chain, *rule)
        return True

    def list_rules(self, table: str, chain: str | None = None) -> list[str]:
        """``iptables -S [chain]`` lines (``-N chain``, ``-A chain ...``); empty if the chain is missing."""
        proc = self._run(table, "-S", *([chain] if chain else []), check=False)
        return proc.stdout.splitlines() if proc.returncode == 0 else []

    def restore(self, table: str, lines: Sequence[str]) -> None:
        """Apply several changes to ``table`` in one atomic ``iptables-restore --noflush`` run.

        ``:CHAIN - [0:0]`` lines create or empty a chain; ``-A``/``-D``/``-X``
        lines work as on the command line.
        """
        text = "\n".join([f"*{table}", *lines, "COMMIT", ""])
        argv = [*self.prefix, f"{self.binary}-restore", "--wait", str(self.wait_seconds), "--noflush"]
        try:
            proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IptablesError(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise IptablesError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\n{text}")
