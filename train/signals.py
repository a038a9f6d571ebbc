"""SIGTERM/SIGINT handling (no torch): record the request, let the current step finish."""

from __future__ import annotations

import signal
from types import FrameType


class StopSignals:
    """Records SIGTERM/SIGINT instead of dying, so the current step can finish and the summary
    be written; a second signal gets the default action (immediate exit)."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in self.HANDLED:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        for sig in self.HANDLED:
            signal.signal(sig, signal.SIG_DFL)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_code(self) -> int:
        """128 + signal number, as a shell reports a death by that signal (143, 130)."""
        return 128 + int(self.signum or signal.SIGTERM)
