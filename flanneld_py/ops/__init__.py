"""Operations around the daemon: systemd notify and watchdog, ``/healthz`` and
``/metrics``, ``--ip-masq``, the control socket, and the ``status``/``trace`` tools.

The daemon knows one entry point, :func:`attach_operations`; the CLI imports
``flanneld_py.ops.status`` and ``flanneld_py.ops.trace`` directly.
"""

from __future__ import annotations

import os
from ipaddress import IPv6Network

from ..state import DaemonState
from .service import Operations
from .snapshot import DaemonView

__all__ = ["attach_operations"]


async def attach_operations(daemon: DaemonView) -> list[Operations]:
    """Start notify, watchdog, health/metrics, control socket and ip-masq for ``daemon``.

    Returns the closeables (``await x.close()``) for the daemon's shutdown.

    Raises:
        FatalError: ``--healthz-port`` cannot be bound.
    """
    operations = Operations(daemon, os.environ)
    operations.ipv6_lease = lambda: ipv6_lease(daemon.state)
    await operations.start()
    return [operations]


def ipv6_lease(state: DaemonState) -> tuple[IPv6Network, IPv6Network] | None:
    """(IPv6 Network, our IPv6 subnet) once we hold a lease with an IPv6 subnet under an EnableIPv6 config."""
    config, own = state.config, state.lease
    if config is None or config.ipv6 is None or own is None or own.subnet6 is None:
        return None
    return config.ipv6.network, own.subnet6
