"""The backend factory: an explicit map from ``Backend.Type`` to backend class (no registration by import).

("Registry" is the subnet store's name, as in flannel: :mod:`flanneld_py.subnet.registry`.)
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Backend, BackendContext, missing_families

__all__ = ["create_backend"]


def _udp(ctx: BackendContext) -> Backend:
    from .udp.backend import UdpBackend

    return UdpBackend(ctx)


def _vxlan(ctx: BackendContext) -> Backend:
    from .vxlan import VxlanBackend

    return VxlanBackend(ctx)


def _host_gw(ctx: BackendContext) -> Backend:
    from .hostgw import HostGwBackend

    return HostGwBackend(ctx)


_FACTORIES: dict[str, Callable[[BackendContext], Backend]] = {
    "udp": _udp,
    "vxlan": _vxlan,
    "host-gw": _host_gw,
}


def create_backend(ctx: BackendContext) -> Backend:
    """The configured backend; ValueError (one line) if it is missing or cannot carry the
    config's address families (the gate IPv6 backends lift by being :class:`~.base.CarriesIPv6`)."""
    kind = ctx.config.backend.type
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        raise ValueError(f"backend type {kind!r} is not available in this build") from None
    backend = factory(ctx)
    problem = missing_families(backend, ctx.config)
    if problem:
        raise ValueError(problem)
    return backend
