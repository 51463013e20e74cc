"""A remote tier's health (``kvtier.tiers.remote``): failures, backoff, and when to probe again.

An I/O failure marks the tier unhealthy; while unhealthy, calls return misses at once, without
touching the network, until ``retry_after_s`` has passed (exponential backoff from
``FIRST_BACKOFF_S``, doubling up to ``MAX_BACKOFF_S``); the next call then probes the server, and
a success marks the tier healthy again. Used by one call at a time (the tier's own threading rule).
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("kvtier.tiers.remote")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


class RemoteHealth:
    """Healthy, or backing off after a failure."""

    def __init__(self, description: str) -> None:
        """``description`` names the store in logs (never with credentials)."""
        self.description = description
        self._healthy = True
        self._backoff_s = 0.0
        self._retry_at = 0.0

    @property
    def healthy(self) -> bool:
        """False from an I/O failure until a later call succeeds."""
        return self._healthy

    @property
    def retry_after_s(self) -> float:
        """Seconds until an unhealthy tier lets the next call probe the server (0.0 when healthy
        or when a probe is due)."""
        if self._healthy:
            return 0.0
        return max(0.0, self._retry_at - time.monotonic())

    def backing_off(self) -> bool:
        """Whether a call must return a miss now, without touching the network."""
        return not self._healthy and time.monotonic() < self._retry_at

    def failed(self, exc: Exception) -> None:
        """A call failed with ``exc``: unhealthy, and the backoff starts or doubles."""
        if self._healthy:
            logger.warning("kvtier: remote tier %s is unhealthy: %s: %s", self.description,
                           type(exc).__name__, exc)
            self._backoff_s = FIRST_BACKOFF_S
        else:
            logger.debug("kvtier: remote tier %s probe failed: %s", self.description, exc)
            self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
        self._healthy = False
        self._retry_at = time.monotonic() + self._backoff_s

    def succeeded(self) -> None:
        """A call succeeded: healthy."""
        if not self._healthy:
            logger.warning("kvtier: remote tier %s is healthy again", self.description)
        self._healthy = True
        self._backoff_s = 0.0
