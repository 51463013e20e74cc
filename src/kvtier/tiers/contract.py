"""The one contract every tier implements: memory, disk and the remote tiers.

A tier holds entries: the payload of one chunk (one tensor-parallel ``rank``'s shard of it) under a
16-byte chunk key, in one tenant ``namespace``. Every method is batch-first (one call, many keys)
and answers with values, never exceptions, for anything the stored bytes or the server do:

- ``exists_prefix``: how many consecutive ``keys`` from the start the tier holds (a prefix lookup;
  a chunk key names its whole prefix, so the first gap ends the usable run);
- ``get_many_into``: read entries into caller buffers (memory slots, staging buffers), one
  ``ReadResult`` each; MISSING, CORRUPT and UNREADABLE are misses, and the buffer of a miss holds
  unspecified bytes (nothing outside it is written);
- ``put_many``: write entries, one bool each (True: the entry is there afterwards, written now or
  before: an entry's content follows from its key, so nothing is overwritten);
- ``delete``: remove some keys' entries; ``delete_namespace``: remove all of a namespace's entries,
  every key and rank, and nothing of any other namespace.

Namespaces are isolated: an entry written in one namespace is absent in every other. The layout
fingerprint is checked on every read of a framed entry (disk, remote: another layout's entry reads
CORRUPT); a tier bound to one layout (disk, memory) refuses a call naming another with ValueError,
as it does for a malformed key or namespace (bad input, not a miss).

Who calls: the worker's transfer executor and upload queue (disk and remote reads and writes),
the disk writer thread, the admin service (deletes, lookups), the transformers integration (the
memory tier). Calls may block on I/O (disk, network): never from an engine's step or under the
scheduler's lock. One thread at a time per instance unless an implementation says more.

Implementations: ``tiers.memory.MemoryTier`` (slots + the store's memory books, one process),
``tiers.disk.DiskFiles``, ``tiers.remote.RemoteTier`` (Redis/Valkey, S3 backends). The contract
suite ``tests/contract/test_tier_contract.py`` runs the same tests against each.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol


class ReadResult(enum.Enum):
    """The outcome of reading one entry. Only OK puts data in the caller's buffer."""

    OK = "ok"
    MISSING = "missing"  # never written, deleted, expired, or the tier could not be asked
    CORRUPT = "corrupt"  # truncated, mismatching or a bad checksum; removed where the tier can
    # an entry this kvtier cannot open (another master key or encryption/compression setting), or
    # a file that could not be opened: a miss, left in place for its owner
    UNREADABLE = "unreadable"


class Tier(Protocol):
    """A tier of kvtier; see the module docstring for the contract."""

    def exists_prefix(self, keys: Sequence[bytes], rank: int, *, namespace: str, max_age_s: int = 0) -> int:
        """How many consecutive ``keys`` of ``namespace`` from the start the tier holds for
        ``rank`` (0 for no keys, and on failure). With ``max_age_s`` (not 0), an entry written
        longer ago than that counts as absent (tiers that expire entries themselves may ignore it)."""
        ...

    def get_many_into(self, items: Sequence[tuple[bytes, memoryview]], rank: int, layout_fingerprint: bytes,
                      *, namespace: str) -> list[ReadResult]:
        """For each ``(key, out)``: read the entry's payload into ``out`` (exactly the payload's
        size) and verify it; the results in order. A failure of the whole batch makes every
        result a miss."""
        ...

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]], rank: int, layout_fingerprint: bytes,
                 *, namespace: str, ttl_s: int = 0) -> list[bool]:
        """Store each ``(key, payload)`` unless the tier holds the entry already (never
        overwritten); True where the entry is there afterwards. ``ttl_s`` (0: the tier's own) caps
        the entry's life where the tier can expire single entries."""
        ...

    def delete(self, keys: Sequence[bytes], rank: int, *, namespace: str) -> int:
        """Remove the entries of ``keys`` of ``namespace`` for ``rank``; how many were removed
        (0 on failure; a tier that cannot tell absent from removed counts every key)."""
        ...

    def delete_namespace(self, namespace: str) -> int | None:
        """Remove every entry of ``namespace`` (all keys and ranks); how many went, or None when
        the tier could not do it (nothing is known to be removed)."""
        ...
