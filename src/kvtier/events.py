"""What each tier stored and removed, as events an engine integration publishes (vLLM: KV events).

The books (``TieredStore`` for memory and disk, ``KVManager``'s remote knowledge) record an event
whenever an entry becomes visible to lookups (``stored``) or stops being visible (``removed``:
evicted, expired, invalidated, failed), so a consumer that applies them in order knows what the
books know. Pending entries (data not yet in place) are never announced. Keys only: the
integration adds the tokens each key covers. Pulled with ``take()``; no thread safety (the
books' thread records and takes).

The log is bounded: if nobody takes events for ``max_events`` records, what is pending is
replaced by one ``cleared`` event per tier, telling consumers to forget the tier (a consumer then
under-estimates what is cached, never over-estimates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EventKind = Literal["stored", "removed", "cleared"]
MAX_PENDING_EVENTS = 1_000_000


@dataclass(frozen=True)
class TierEvent:
    """``keys`` (chunk keys, in the order recorded) became visible on ``tier`` (``stored``) or
    stopped being visible there (``removed``); ``cleared``: forget everything of ``tier``."""

    kind: EventKind
    tier: str
    keys: tuple[bytes, ...] = ()


class EventLog:
    """Events in the order recorded; consecutive events of one kind and tier are merged."""

    def __init__(self, tiers: tuple[str, ...], max_events: int = MAX_PENDING_EVENTS) -> None:
        self._tiers = tiers
        self._max_events = max_events
        self._events: list[tuple[EventKind, str, list[bytes]]] = []
        self._num_keys = 0
        self._overflowed = False

    def stored(self, tier: str, key: bytes) -> None:
        self._record("stored", tier, key)

    def removed(self, tier: str, key: bytes) -> None:
        self._record("removed", tier, key)

    def take(self) -> list[TierEvent]:
        """The events since the last call, oldest first."""
        if self._overflowed:
            taken = [TierEvent("cleared", tier) for tier in self._tiers]
        else:
            taken = [TierEvent(kind, tier, tuple(keys)) for kind, tier, keys in self._events]
        self._events, self._num_keys, self._overflowed = [], 0, False
        return taken

    def _record(self, kind: EventKind, tier: str, key: bytes) -> None:
        if self._overflowed:
            return
        if self._num_keys >= self._max_events:
            self._overflowed = True
            self._events, self._num_keys = [], 0
            return
        self._num_keys += 1
        if self._events and self._events[-1][0] == kind and self._events[-1][1] == tier:
            self._events[-1][2].append(key)
        else:
            self._events.append((kind, tier, [key]))
