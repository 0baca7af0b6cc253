"""Errors shared by the daemon's wiring and the parts around it (a leaf module: imports nothing)."""

from __future__ import annotations

__all__ = ["FatalError"]


class FatalError(RuntimeError):
    """Ends the daemon with exit code 1 and this message (one line that says what to fix)."""
