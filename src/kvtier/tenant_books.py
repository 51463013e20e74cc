"""Per tenant namespace, for the store's books (``kvtier.store``): its limits and its entries.

Limits (``NamespaceLimits``, 0 = none): a TTL, and byte quotas in memory and on disk, counted here
in entries of ``chunk_bytes`` each. Entries: how many each namespace holds per tier; a namespace
holding none is not listed. Pure bookkeeping: the store decides what to evict or expire.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from kvtier.config import NamespaceLimits

_NO_LIMITS = NamespaceLimits()


@dataclass(frozen=True)
class Usage:
    """Entries one namespace holds."""

    memory: int
    disk: int


class TenantBooks:
    """Limits and entry counts per namespace (others: no limits)."""

    def __init__(self, limits: Mapping[str, NamespaceLimits], chunk_bytes: int) -> None:
        self._limits = dict(limits)
        self._chunk_bytes = chunk_bytes
        self.in_memory: Counter[str] = Counter()  # entries per namespace in the memory tier
        self.on_disk: Counter[str] = Counter()  # entries per namespace in the disk tier

    def limits(self) -> dict[str, NamespaceLimits]:
        return dict(self._limits)

    def set_limits(self, namespace: str, limits: NamespaceLimits) -> None:
        self._limits[namespace] = limits

    def ttl_of(self, namespace: str) -> int:
        return self._limits.get(namespace, _NO_LIMITS).ttl_s

    def any_ttl(self) -> bool:
        """Whether any namespace has a TTL (else nothing ever expires)."""
        return any(limits.ttl_s for limits in self._limits.values())

    def expired(self, namespace: str, created: float, now: float) -> bool:
        """Whether an entry of ``namespace`` written at ``created`` is older than its TTL at ``now``."""
        ttl = self.ttl_of(namespace)
        return ttl > 0 and now - created > ttl

    def memory_quota(self, namespace: str) -> int | None:
        """``namespace``'s memory quota in entries; None: no quota."""
        quota = self._limits.get(namespace, _NO_LIMITS).memory_bytes
        return quota // self._chunk_bytes if quota else None

    def disk_quota(self, namespace: str) -> int | None:
        """``namespace``'s disk quota in entries; None: no quota."""
        quota = self._limits.get(namespace, _NO_LIMITS).disk_bytes
        return quota // self._chunk_bytes if quota else None

    def usage(self) -> dict[str, Usage]:
        """Entries per namespace (those holding any)."""
        names = set(self.in_memory) | set(self.on_disk)
        return {name: Usage(self.in_memory[name], self.on_disk[name]) for name in sorted(names)}


def uncount(usage: Counter[str], namespace: str) -> None:
    """One entry of ``namespace`` fewer; namespaces holding none are not listed."""
    usage[namespace] -= 1
    if not usage[namespace]:
        del usage[namespace]
