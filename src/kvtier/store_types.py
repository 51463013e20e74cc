"""The store's entries and answers (``kvtier.store``): value types, no behaviour.

``State``, ``MemoryEntry`` and ``DiskEntry`` are the books' entries; ``DiskItem`` and
``DiskSettings`` describe the disk tier at start-up; ``Lookup`` and ``Invalidated`` are what
the store answers. Import them from ``kvtier.store``, which re-exports them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class State(enum.Enum):
    PENDING = "pending"  # planned, the worker has not reported the data in place yet
    READY = "ready"


@dataclass
class MemoryEntry:
    slot: int
    state: State
    namespace: str
    created: float  # when the data was first computed (a promoted entry keeps its disk time)
    on_disk: bool = False
    doomed: bool = False  # invalidated or expired: never found again, dropped once unleased


@dataclass
class DiskEntry:
    state: State
    namespace: str
    created: float


@dataclass(frozen=True)
class DiskItem:
    """A disk entry found at start-up."""

    key: bytes
    namespace: str
    created: float  # the file's modification time


@dataclass(frozen=True)
class Lookup:
    """The longest prefix of looked-up keys held by any tier."""

    num_chunks: int
    disk_only: tuple[int, ...]  # indices (within the prefix) held on disk but not in memory


@dataclass(frozen=True)
class DiskSettings:
    capacity_entries: int
    write_through: bool
    initial: Sequence[DiskItem] = ()  # oldest first, from the scan of the directory


@dataclass(frozen=True)
class Invalidated:
    """How many entries an invalidation removed from the books, per tier."""

    memory: int
    disk: int
