"""The wall-clock deadline of one public call on a remote tier (``kvtier.tiers.remote``)."""

from __future__ import annotations

import math
import time


class CallDeadline:
    """The wall-clock deadline of the public call in progress on one tier (none between calls).
    Backends read it before each blocking operation: a socket gets at most ``remaining_s()``, and
    ``check`` raises ``TimeoutError`` (an ``OSError``: an I/O failure) once it has passed."""

    def __init__(self) -> None:
        self._at = math.inf  # no call in progress

    def start(self, timeout_s: float) -> bool:
        """Start a deadline ``timeout_s`` from now; False, keeping it, when one runs (nested calls share it)."""
        if started := self._at == math.inf:
            self._at = time.monotonic() + timeout_s
        return started

    def clear(self) -> None:  # the call is over
        self._at = math.inf

    def remaining_s(self) -> float:
        """Seconds left (``math.inf`` when no call is in progress; <= 0 once passed)."""
        return self._at - time.monotonic()

    def check(self) -> float:
        """Seconds left; ``TimeoutError`` when none are."""
        if (remaining := self.remaining_s()) > 0:
            return remaining
        raise TimeoutError("the remote call passed its deadline (remote.timeout_ms)")
