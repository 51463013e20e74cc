"""Verified reads of a remote tier's values (``kvtier.tiers.remote``): groups, checks, decode threads.

A batch is fetched in groups: one group when the values land in the callers' buffers (values in
clear); sealed or compressed values land in temporary buffers (at most the sealed or raw length),
in groups of about ``SEALED_GROUP_BYTES`` (at least ``MIN_GROUP_ITEMS``), which bounds the
temporary memory held at once. Each value is then verified (header, length, checksum) and
decrypted and decoded into the caller's buffer: OK, MISSING, CORRUPT (bad bytes) or UNREADABLE
(another master key or setting). Values to decrypt or decode are checked on ``DECODE_THREADS``
threads (AES-GCM, zstd and numpy release the GIL). No I/O here: the tier fetches.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvtier.compression import KVCodec
from kvtier.crypto import Sealer
from kvtier.entry import HEADER_BYTES
from kvtier.errors import EntryError, UnreadableEntryError
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.framing import check_readable, stored_bytes, unframe_into
from kvtier.tiers.io_threads import unbind_this_thread

logger = logging.getLogger("kvtier.tiers.remote")

SEALED_GROUP_BYTES = 64 << 20  # sealed reads fetch about this much per group (temporary buffers)
MIN_GROUP_ITEMS = 4  # ... and at least this many items, to keep concurrent backends busy
DECODE_THREADS = min(4, os.cpu_count() or 1)  # verify + decrypt + decode of a batch's values


@dataclass(frozen=True)
class Fetched:
    """What a backend read for one name: the value's first bytes and its full length."""

    header: bytes  # the first HEADER_BYTES bytes of the value (fewer, or none, if its length is wrong)
    value_bytes: int  # the stored value's length in bytes


class EntryReader:
    """Groups, temporary buffers and verification of the values a tier fetches."""

    def __init__(self, description: str, sealer: Sealer | None, codec: KVCodec | None) -> None:
        """``description`` names the store in logs; ``sealer`` and ``codec``: the tier's settings."""
        self.description = description
        self.sealer = sealer
        self.codec = codec
        self._decoders: concurrent.futures.ThreadPoolExecutor | None = None  # made on first use

    @property
    def buffered(self) -> bool:
        """Values land in temporary buffers (sealed or compressed), not in the callers'."""
        return self.sealer is not None or self.codec is not None

    def groups(self, outs: Sequence[memoryview]) -> list[tuple[int, int]]:
        """``(start, stop)`` of the groups a batch is fetched in (module docstring)."""
        if not self.buffered:
            return [(0, len(outs))]
        groups: list[tuple[int, int]] = []
        start, num_bytes = 0, 0
        for index, out in enumerate(outs):
            if index - start >= MIN_GROUP_ITEMS and num_bytes + out.nbytes > SEALED_GROUP_BYTES:
                groups.append((start, index))
                start, num_bytes = index, 0
            num_bytes += out.nbytes
        return groups + [(start, len(outs))]

    def landing(self, outs: Sequence[memoryview]) -> list[memoryview]:
        """Where the values of ``outs`` are fetched to: ``outs`` themselves, or temporary buffers
        of the stored (sealed or compressed) length when ``buffered``."""
        if not self.buffered:
            return list(outs)
        return [memoryview(bytearray(stored_bytes(out.nbytes, self.sealer))) for out in outs]

    def verify(self, found: Fetched | None, key: bytes, rank: int, layout_fingerprint: bytes,
               stored: memoryview, out: memoryview, name: str, namespace: str) -> ReadResult:
        """The result of one fetched value: ``found`` as the backend returned it, its payload at
        the start of ``stored`` (which is ``out`` itself when not ``buffered``). MISSING, OK
        (``out`` holds the chunk), CORRUPT or UNREADABLE; raises nothing, whatever the bytes."""
        if found is None:
            return ReadResult.MISSING
        try:
            most = HEADER_BYTES + stored.nbytes
            if found.value_bytes != most and not (self.codec is not None and HEADER_BYTES <= found.value_bytes < most):
                check_readable(found.header, self.sealer, self.codec)  # another setting's value: kept
                raise EntryError(f"value has {found.value_bytes} bytes, expected {most}"
                                 f"{' or fewer' if self.codec is not None else ''}")
            unframe_into(found.header, stored[:found.value_bytes - HEADER_BYTES], key, rank, layout_fingerprint,
                         out, self.sealer, namespace, self.codec)
        except UnreadableEntryError as exc:  # another key or setting: a miss, left for its owner
            logger.warning("kvtier: remote entry %s in %s cannot be opened by this kvtier (left in place): %s",
                           name, self.description, exc)
            return ReadResult.UNREADABLE
        except EntryError as exc:
            logger.warning("kvtier: bad remote entry %s in %s: %s", name, self.description, exc)
            return ReadResult.CORRUPT
        return ReadResult.OK

    def run_checks(self, checks: list[Callable[[], ReadResult]]) -> list[ReadResult]:
        """Run the verifications of a group: on ``DECODE_THREADS`` threads when the values must be
        decrypted or decoded, else inline."""
        if not self.buffered or len(checks) < 2 or DECODE_THREADS < 2:
            return [check() for check in checks]
        if self._decoders is None:
            self._decoders = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="kvtier-decode",
                                                                   initializer=unbind_this_thread)
        return list(self._decoders.map(lambda check: check(), checks))

    def close(self) -> None:
        """Stop the decode threads (made again on the next use). Idempotent."""
        if self._decoders is not None:
            self._decoders.shutdown()
            self._decoders = None
