"""Is loading cheaper than recomputing? A small, measured answer.

The scheduler feeds it what it observes: how fast the engine prefills (tokens per second of busy
steps) and how fast the remote tier delivers (bytes per second of finished fetches). A fetch is
planned only when it is expected to finish before the engine could recompute the same tokens;
until both rates are measured, fetching is assumed to pay (the first fetches measure it).
Exponentially weighted averages follow a changing machine or network. Pure, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

SMOOTHING = 0.2  # weight of the newest observation


@dataclass
class Rate:
    """An exponentially weighted rate (units per second); None until observed."""

    per_s: float | None = None

    def observe(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:
            return
        rate = amount / seconds
        self.per_s = rate if self.per_s is None else (1 - SMOOTHING) * self.per_s + SMOOTHING * rate


class CostModel:
    """Measured prefill speed vs remote fetch speed."""

    def __init__(self, min_step_tokens: int) -> None:
        self.prefill_tokens = Rate()
        self.remote_bytes = Rate()
        self._min_step_tokens = min_step_tokens

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One engine step that computed ``num_tokens`` in ``seconds`` (small steps are ignored:
        decode steps say little about prefill speed)."""
        if num_tokens >= self._min_step_tokens:
            self.prefill_tokens.observe(num_tokens, seconds)

    def observe_fetch(self, num_bytes: int, seconds: float) -> None:
        self.remote_bytes.observe(num_bytes, seconds)

    def fetch_pays(self, num_bytes: int, num_tokens: int) -> bool:
        """True when fetching ``num_bytes`` is expected to beat recomputing ``num_tokens``."""
        if self.prefill_tokens.per_s is None or self.remote_bytes.per_s is None:
            return True
        fetch_s = num_bytes / self.remote_bytes.per_s
        recompute_s = num_tokens / self.prefill_tokens.per_s
        return fetch_s < recompute_s
