"""Store admission: store a chunk when storing is likely to pay, learned from the traffic.

Storing a chunk costs the engine time on every request (copying its KV out, writing it to disk),
and pays only when a later request reuses it. On traffic where prompts do not repeat, a cache that
stores everything makes every request slower and serves nothing. The rule here measures reuse
and admits accordingly:

- every request's chunk keys are *observed* once, at its lookup; a key seen before (in an earlier
  request, stored or not) counts as reused;
- the reuse ratio is the share of reused keys among the last ``window`` observed keys;
- ``adaptive`` (the default) admits every chunk while the ratio is at least ``min_reuse`` (or too
  few keys have been seen to tell), and otherwise only chunks seen in an earlier request too
  ("second sight"): traffic without reuse stores nothing, a prefix that does come back is stored
  on its second request and served from its third;
- ``always`` admits everything; ``second_sight`` always waits for the second sight.

Pure logic on keys: no I/O, no clocks, no torch. Memory is bounded by ``remembered`` keys (the
oldest sightings are forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

POLICIES = ("adaptive", "always", "second_sight")
LEARNING_CHUNKS = 64  # chunks looked up before reuse is judged (fewer if the window is shorter)


class Admission:
    """Decides whether a computed chunk is stored; see the module docstring."""

    def __init__(self, policy: str, min_reuse: float, window: int, remembered: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"admission policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if not 0.0 <= min_reuse <= 1.0:
            raise ValueError(f"min_reuse must be within 0..1, not {min_reuse}")
        if window < 1 or remembered < 1:
            raise ValueError("window and remembered must be > 0")
        self.policy = policy
        self.min_reuse = min_reuse
        self._window: deque[bool] = deque(maxlen=window)
        self._reused_in_window = 0
        self._sightings: OrderedDict[bytes, int] = OrderedDict()  # key -> requests that looked it up
        self._remembered = remembered

    @property
    def reuse_ratio(self) -> float | None:
        """Share of reused keys among the last ``window`` observed; None before any."""
        return self._reused_in_window / len(self._window) if self._window else None

    @property
    def learning(self) -> bool:
        """True until a quarter of the window has been observed: too little to judge reuse."""
        maxlen = self._window.maxlen or 1
        return len(self._window) < max(1, min(maxlen // 4, LEARNING_CHUNKS))

    def observe(self, keys: Sequence[bytes]) -> None:
        """One request's chunk keys, once per request (its prompt's full chunks, in order)."""
        for key in dict.fromkeys(keys):  # a key repeated within one prompt is one sighting
            count = self._sightings.pop(key, 0)
            self._sightings[key] = count + 1
            self._record(count > 0)
        while len(self._sightings) > self._remembered:
            self._sightings.popitem(last=False)

    def admit(self, key: bytes) -> bool:
        """Whether a chunk computed by the engine is stored now."""
        if self.policy == "always":
            return True
        if self.policy == "adaptive" and (self.learning or (self.reuse_ratio or 0.0) >= self.min_reuse):
            return True
        return self._sightings.get(key, 0) >= 2

    def _record(self, reused: bool) -> None:
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._reused_in_window -= 1
        self._window.append(reused)
        self._reused_in_window += reused
