"""What a remote backend implements (``kvtier.tiers.remote``): a few primitives over names and bytes.

Backends (Redis, S3, the peer tier) subclass ``RemoteTier``, which builds the tier contract on
these primitives once (naming, framing, verification, health, deadlines); this class only states
them. Each primitive may raise one of ``io_errors`` on I/O failure (the tier turns that into a
miss and backs off); anything else is a bug and propagates. Each is called under the public call's
wall-clock deadline (``RemoteTier.deadline``), by which a backend bounds every blocking operation,
and by one thread at a time per instance.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from kvtier.tiers.remote_reads import Fetched


class RemoteBackend(abc.ABC):
    """The primitives of a remote store."""

    #: Exceptions a backend's primitives raise on I/O failure; anything else is a bug and propagates.
    io_errors: tuple[type[Exception], ...] = (OSError,)

    @abc.abstractmethod
    def _connect(self) -> None:
        """Build the client and check the server answers (one round trip). Called at start
        and before any primitive until it has succeeded once."""

    @abc.abstractmethod
    def _count_prefix(self, names: Sequence[str], max_age_s: int) -> int:
        """How many consecutive ``names`` from the start exist (non-empty ``names``); a backend
        that cannot expire single entries also treats those older than ``max_age_s`` (if not 0)
        as absent."""

    def _prefix_ages(self, names: Sequence[str], max_age_s: int) -> list[float]:
        """The age in seconds of each of the consecutive ``names`` from the start that exist;
        backends that can tell the age override this (the default says 0.0 for each)."""
        return [0.0] * self._count_prefix(names, max_age_s)

    @abc.abstractmethod
    def _fetch_many(self, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        """For each ``(name, out)``: None when absent, else the value's first bytes and length;
        when ``HEADER_BYTES <= value_bytes <= HEADER_BYTES + out.nbytes`` the rest of the value
        is in the start of ``out``."""

    @abc.abstractmethod
    def _put_new(self, name: str, header: bytes, payload: memoryview, ttl_s: int | None) -> bool:
        """Store ``header + payload`` under ``name`` unless it exists, expiring after ``ttl_s``
        (None: never) where the backend can; True when the value is there afterwards."""

    @abc.abstractmethod
    def _delete_many(self, names: Sequence[str]) -> int:
        """Remove ``names``; returns how many the server removed."""

    @abc.abstractmethod
    def _delete_prefix(self, prefix: str) -> int:
        """Remove every name that starts with ``prefix``; returns how many went."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the client's resources."""
