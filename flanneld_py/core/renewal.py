"""When to refresh our etcd lease, and how long to back off after a failure."""

from __future__ import annotations

__all__ = ["Backoff", "renewal_delay"]


def renewal_delay(ttl: float, margin: float) -> float:
    """Seconds from a successful refresh to the next one.

    Flannel renews ``margin`` before expiry. A margin as long as the TTL
    (short test TTLs with the default 60 min margin) would renew in a busy
    loop, so then we refresh three times per TTL instead.
    """
    if ttl <= 0:
        return 1.0
    if 0 < margin < ttl:
        return ttl - margin
    return max(ttl / 3, 0.5)


class Backoff:
    """Exponential backoff with a ceiling; ``reset()`` after a success."""

    def __init__(self, first: float = 0.5, ceiling: float = 10.0) -> None:
        self.first = first
        self.ceiling = ceiling
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self._next = self.first
