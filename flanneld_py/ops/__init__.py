"""Operations around the daemon: systemd notify and watchdog, ``/healthz`` and
``/metrics``, ``--ip-masq``, the control socket, and the ``status``/``trace`` tools.

The daemon knows one entry point, :func:`attach_operations`; the CLI imports
``flanneld_py.ops.status`` and ``flanneld_py.ops.trace`` directly.
"""

from __future__ import annotations

import os

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
    await operations.start()
    return [operations]
