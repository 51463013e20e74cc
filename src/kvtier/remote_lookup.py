"""Prefix lookups on a remote tier, off the engine's thread and bounded by a deadline.

A remote tier is shared, so no process keeps its index: each new request has to ask it how many
of its chunks it holds. ``RemoteLookups`` asks on one background thread, so the engine's
scheduler never blocks on the network: ``ask`` waits at most ``inline_wait_s`` (long enough for a
healthy server on the same network to answer) and otherwise says "not yet" (None); the caller
tells the engine to ask again later and calls ``ask`` again. An answer that has not come back
``timeout_s`` after the question counts as "holds nothing", whatever the server does; the late
answer is dropped. Called from one thread (the scheduler's).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.remote import RemoteTier


@dataclass
class _Question:
    keys: tuple[bytes, ...]
    future: "concurrent.futures.Future[list[float]]"
    deadline: float


class RemoteLookups:
    def __init__(self, remote: RemoteTier, rank: int, timeout_s: float, inline_wait_s: float) -> None:
        self._remote = remote
        self._rank = rank
        self._timeout_s = timeout_s
        self._inline_wait_s = inline_wait_s
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-lookup",
                                                                  initializer=unbind_this_thread)
        self._questions: dict[str, _Question] = {}
        self.num_timeouts = 0

    def ask(self, owner: str, keys: Sequence[bytes], namespace: str, max_age_s: int) -> list[float] | None:
        """The consecutive ``keys`` of ``namespace`` from the start the remote holds, as the age
        in seconds of each (``RemoteTier.held_ages``; [] on failure, while unhealthy, or past
        the deadline), or None while the answer is pending. Each answer is given once: the next
        call for ``owner`` asks the remote again."""
        question = self._questions.get(owner)
        if question is None or question.keys != tuple(keys):
            question = _Question(tuple(keys), self._thread.submit(self._remote.held_ages, list(keys), self._rank,
                                                                  namespace=namespace, max_age_s=max_age_s),
                                 time.monotonic() + self._timeout_s)
            self._questions[owner] = question
            concurrent.futures.wait([question.future], timeout=self._inline_wait_s)
        if question.future.done():
            del self._questions[owner]
            return question.future.result()
        if time.monotonic() >= question.deadline:
            del self._questions[owner]
            self.num_timeouts += 1
            return []
        return None

    def forget(self, owner: str) -> None:
        """Drop ``owner``'s pending question (its answer, when it comes, is ignored)."""
        self._questions.pop(owner, None)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
