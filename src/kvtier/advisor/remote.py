"""The remote tier in the advisor's replay: a shared store that kvtier uploads to and reads from,
but does not evict from.

kvtier uploads a chunk when memory stores it and the remote is not known to hold it, and reads the
chunks after the run memory and disk hold that the remote holds (``KVManager``). What the remote
keeps is the server's choice, not kvtier's: Redis with ``maxmemory-policy allkeys-lru`` evicts
the least recently used key, which this model follows (an LRU of entries, a read or an upload
makes a chunk the most recent); an S3 bucket keeps everything for its TTL (``capacity_entries``
None: unbounded).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class RemoteModel:
    def __init__(self, capacity_entries: int | None) -> None:
        if capacity_entries is not None and capacity_entries < 1:
            raise ValueError("a remote tier holds at least one entry")
        self._capacity = capacity_entries
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.num_evictions = 0

    def held_run(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, the remote holds; those become the most recent."""
        count = 0
        for key in keys:
            if key not in self._keys:
                break
            self._keys.move_to_end(key)
            count += 1
        return count

    def upload(self, key: bytes) -> bool:
        """Store ``key`` unless held (then it becomes the most recent); True if it was uploaded."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if self._capacity is not None and len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
            self.num_evictions += 1
        return True
