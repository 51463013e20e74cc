"""Leases: entries in use belong to an owner (a request id) until the owner releases them.

There are no counts to get wrong: an entry is leased while any owner holds it, and releasing an
owner releases everything it holds, so a finished or aborted request can never leak a pin.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


class Leases:
    """Owner -> keys, and key -> owners. Used only from the scheduler thread."""

    def __init__(self) -> None:
        self._by_owner: dict[str, set[bytes]] = defaultdict(set)
        self._owners: dict[bytes, set[str]] = defaultdict(set)

    def acquire(self, owner: str, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._by_owner[owner].add(key)
            self._owners[key].add(owner)

    def release(self, owner: str) -> None:
        """Release every key ``owner`` holds; unknown owners are fine."""
        for key in self._by_owner.pop(owner, ()):
            owners = self._owners[key]
            owners.discard(owner)
            if not owners:
                del self._owners[key]

    def is_leased(self, key: bytes) -> bool:
        return key in self._owners

    def num_owners(self) -> int:
        return len(self._by_owner)
