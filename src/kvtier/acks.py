"""What the tensor-parallel ranks reported, for the store's books (``kvtier.store``).

Every rank runs the same plan on its own shard, so an operation is done only once every rank
reported it: ``RankAcks`` counts the reports of each operation until all ``world_size`` ranks
did. ``SlotWrites`` follows the write-throughs in flight: the disk writer reads the chunk straight
from its memory slot, so that slot is not reused until every rank reported the write (written or
failed). Pure bookkeeping, called from the scheduler's thread: no bytes, no I/O.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass


class RankAcks:
    """Per (kind, key), how many ranks acknowledged an operation that not every rank has yet."""

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size
        self._counts: Counter[tuple[str, bytes]] = Counter()

    def count(self, kind: str, keys: Sequence[bytes]) -> list[bytes]:
        """Count one rank's acknowledgement of each of ``keys``; returns those every rank has
        acknowledged now (their counts are forgotten)."""
        done: list[bytes] = []
        for key in keys:
            self._counts[(kind, key)] += 1
            if self._counts[(kind, key)] >= self._world_size:
                del self._counts[(kind, key)]
                done.append(key)
        return done

    def forget(self, kind: str, key: bytes) -> None:
        """Drop what the ranks acknowledged of ``key``'s operation (it failed on some rank)."""
        self._counts.pop((kind, key), None)

    def __len__(self) -> int:
        """How many operations some but not all ranks acknowledged."""
        return len(self._counts)


@dataclass
class _SlotWrite:
    """A write-through in flight: the disk writer reads the chunk straight from ``slot``, so the
    slot is not reused until every rank reported the write (written or failed)."""

    slot: int
    reports_left: int
    released: bool = False  # the memory entry is gone: free the slot when the write is done


class SlotWrites:
    """The write-throughs in flight, per key oldest first."""

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size
        self._writes: dict[bytes, deque[_SlotWrite]] = {}

    def begin(self, key: bytes, slot: int) -> None:
        """A write-through of ``key`` from ``slot`` was planned: every rank will report it."""
        self._writes.setdefault(key, deque()).append(_SlotWrite(slot, self._world_size))

    def __contains__(self, key: object) -> bool:
        """Whether a write-through of ``key`` is in flight."""
        return key in self._writes

    def hold(self, key: bytes, slot: int) -> bool:
        """Whether a write-through still reads ``slot`` (whose entry is gone); if so the slot is
        freed when that write is done (``reported`` returns it)."""
        for write in self._writes.get(key, ()):
            if write.slot == slot and not write.released:
                write.released = True
                return True
        return False

    def reported(self, key: bytes) -> int | None:
        """One rank reported the oldest write-through of ``key`` done (written or failed); returns
        its slot when that was the last report and the slot is now free, else None."""
        writes = self._writes.get(key)
        if not writes:
            return None  # a spill: it wrote a copy, not the slot
        writes[0].reports_left -= 1
        if writes[0].reports_left > 0:
            return None
        done = writes.popleft()
        if not writes:
            del self._writes[key]
        return done.slot if done.released else None
