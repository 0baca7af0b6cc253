"""The progress line: one line rewritten in place on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.context = ""
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def line(self, label: str) -> str:
        elapsed = int(self.clock() - self.started)
        context = f"{self.context} · " if self.context else ""
        return f"[{self.done:>3}/{self.total} {elapsed // 60:d}m{elapsed % 60:02d}s] {context}{label}"

    def step(self, label: str) -> None:
        """A new step starts: count the previous one as done and show this one."""
        self.done = min(self.total, self.done + 1)
        self._show(self.line(label))

    def note(self, text: str) -> None:
        """A line that stays (a failure, a result)."""
        if self._tty:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._width = 0

    def _show(self, text: str) -> None:
        if self._tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, text: str) -> None:
        self.done = self.total
        self.note(text)
