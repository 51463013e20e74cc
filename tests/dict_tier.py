"""A remote tier in a dict: the backend primitives as Redis implements them, no network.

For tests of the logic above the backends (the read path's checks, the scheduler's handoff wait);
the contract suite (tests/integration/test_remote_contract.py) runs the same contract on real servers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvtier.compression import KVCodec
from kvtier.crypto import Sealer
from kvtier.entry import HEADER_BYTES
from kvtier.tiers.remote import Fetched, RemoteTier


class DictTier(RemoteTier):
    """A remote tier in a dict: the backend primitives as Redis implements them, no network.
    Counts the prefix queries it answers."""

    def __init__(self, sealer: Sealer | None = None, codec: KVCodec | None = None) -> None:
        super().__init__("dict", 1.0, sealer, codec)
        self.values: dict[str, bytes] = {}
        self.num_prefix_queries = 0
        self.delay_s = 0.0  # every lookup and read takes this long (a slow or stalled server)
        self._start()

    def _connect(self) -> None:
        pass

    def _count_prefix(self, names: Sequence[str], max_age_s: int) -> int:
        time.sleep(self.delay_s)
        self.num_prefix_queries += 1
        count = 0
        while count < len(names) and names[count] in self.values:
            count += 1
        return count

    def _fetch_many(self, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        time.sleep(self.delay_s)
        fetched: list[Fetched | None] = []
        for name, out in items:
            value = self.values.get(name)
            if value is not None and HEADER_BYTES <= len(value) <= HEADER_BYTES + out.nbytes:
                out[:len(value) - HEADER_BYTES] = value[HEADER_BYTES:]
            fetched.append(None if value is None else Fetched(value[:HEADER_BYTES], len(value)))
        return fetched

    def _put_new(self, name: str, header: bytes, payload: memoryview, ttl_s: int | None) -> bool:
        self.values.setdefault(name, header + bytes(payload))
        return True

    def _delete_prefix(self, prefix: str) -> int:
        return self._delete_many([name for name in self.values if name.startswith(prefix)])

    def _delete_many(self, names: Sequence[str]) -> int:
        return sum(self.values.pop(name, None) is not None for name in names)

    def _close(self) -> None:
        pass
