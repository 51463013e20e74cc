"""Send a workload's requests at their arrival times, concurrently, and time each one.

Each request is sent at its ``arrival_s`` (after the start of the repeat), or when the request it
waits for (``after``) has finished, whichever is later, and only while fewer than
``max_concurrency`` requests are in flight; requests waiting for a free slot go in the order they
became ready (first come, first served). One thread per request in flight; the caller's thread
schedules. A request's *ready time* is its arrival (for a trace: its timestamp), or when its
predecessor finished if that is later; its *lag* is how long after the ready time it was sent (a
concurrency limit, or a dispatcher that falls behind the trace). TTFT is measured from the ready
time, so falling behind the trace shows in TTFT and in the lag; inter-token gaps and the total time
are measured from sending. A request that fails is recorded as a failure (its error text), never retried; a
request whose predecessor failed is still sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.bench.client import ChatResult, RequestOptions, stream_chat, stream_completion
from kvtier.bench.specs import BenchRequest, ChatPrompt
from kvtier.errors import ServerError

Progress = Callable[[str], None]
_PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Target:
    base_url: str
    model: str  # the served model name


@dataclass(frozen=True)
class RequestResult:
    index: int
    round: int
    sent_s: float  # seconds after the repeat started
    ttft_s: float  # from the ready time (arrival, or the predecessor's end): lag + the server's TTFT
    total_s: float  # from sending to the last chunk
    itl_s: tuple[float, ...]  # gaps between consecutive content chunks of the stream
    num_prompt_tokens: int
    num_cached_tokens: int | None
    num_completion_tokens: int
    lag_s: float = 0.0  # sent this long after it was ready

    @property
    def finished_s(self) -> float:
        return self.sent_s + self.total_s

    @property
    def ready_s(self) -> float:
        return self.sent_s - self.lag_s


@dataclass(frozen=True)
class RequestFailure:
    index: int
    error: str


@dataclass(frozen=True)
class DispatchOutcome:
    results: tuple[RequestResult, ...]  # in the order requests finished
    failures: tuple[RequestFailure, ...]
    wall_s: float  # from the start to the last answer


def send(target: Target, request: BenchRequest, options: RequestOptions, timeout_s: float) -> ChatResult:
    """One request, chat or token prompt. Raises ServerError."""
    if isinstance(request.prompt, ChatPrompt):
        return stream_chat(target.base_url, target.model, request.prompt.as_messages(), request.max_tokens,
                           timeout_s, options)
    return stream_completion(target.base_url, target.model, list(request.prompt.token_ids), request.max_tokens,
                             timeout_s, options)


def chunk_gaps(chunk_times_s: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(later - earlier for earlier, later in zip(chunk_times_s, chunk_times_s[1:]))


class _Run:
    """The shared state of one dispatch, guarded by ``cond``: in flight, finish times, results."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.num_in_flight = 0
        self.finished_s: dict[int, float] = {}  # request index -> when it finished (or failed)
        self.results: list[RequestResult] = []
        self.failures: list[RequestFailure] = []
        self.started_s = time.perf_counter()

    def now_s(self) -> float:
        return time.perf_counter() - self.started_s

    def ready_s(self, request: BenchRequest) -> float | None:
        """When ``request`` became sendable (arrived, and its predecessor finished); None if not yet."""
        if request.after is None:
            return request.arrival_s
        finished_s = self.finished_s.get(request.after)
        return None if finished_s is None else max(request.arrival_s, finished_s)

    def finish(self, index: int, outcome: RequestResult | RequestFailure) -> None:
        with self.cond:
            if isinstance(outcome, RequestResult):
                self.results.append(outcome)
            else:
                self.failures.append(outcome)
            self.finished_s[index] = self.now_s()
            self.num_in_flight -= 1
            self.cond.notify_all()


def _serve_one(run: _Run, target: Target, request: BenchRequest, ready_s: float, options: RequestOptions,
               timeout_s: float) -> None:
    sent_s = run.now_s()
    try:
        answer = send(target, request, options, timeout_s)
    except ServerError as exc:
        run.finish(request.index, RequestFailure(request.index, str(exc)))
        return
    lag_s = max(0.0, sent_s - ready_s)
    run.finish(request.index, RequestResult(request.index, request.round, sent_s, lag_s + answer.ttft_s,
                                            answer.total_s, chunk_gaps(answer.chunk_times_s),
                                            answer.num_prompt_tokens, answer.num_cached_tokens,
                                            answer.num_completion_tokens, lag_s))


def _next(run: _Run, waiting: list[BenchRequest]) -> BenchRequest | None:
    """The waiting request that became sendable first (ties: lowest index), if any; ``waiting`` is
    sorted by arrival. Call with ``run.cond`` held."""
    now_s, best, best_key = run.now_s(), None, (0.0, 0)
    for request in waiting:
        if request.arrival_s > now_s:
            break
        ready_s = run.ready_s(request)
        if ready_s is not None and (best is None or (ready_s, request.index) < best_key):
            best, best_key = request, (ready_s, request.index)
    return best


def _wait_s(run: _Run, waiting: list[BenchRequest]) -> float:
    """How long to sleep before something may change: the next arrival, at most 0.5 s (a finished
    request wakes the dispatcher earlier)."""
    now_s = run.now_s()
    upcoming = next((r.arrival_s for r in waiting if r.arrival_s > now_s), now_s + 0.5)
    return max(0.001, min(0.5, upcoming - now_s))


def dispatch(target: Target, requests: tuple[BenchRequest, ...], options: RequestOptions, max_concurrency: int,
             timeout_s: float, progress: Progress) -> DispatchOutcome:
    """Send every request (see the module docstring) and wait for all answers. Blocks the caller.
    Among requests ready to go, the one that became ready first is sent first (ties: lower index),
    so a concurrency limit never reorders a workload. ``progress`` gets a line every few seconds."""
    run = _Run()
    waiting = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    next_report_s = _PROGRESS_EVERY_S
    with run.cond:
        while waiting or run.num_in_flight:
            chosen = _next(run, waiting) if run.num_in_flight < max_concurrency else None
            if chosen is None:
                run.cond.wait(_wait_s(run, waiting))
                next_report_s = _maybe_report(run, len(requests), next_report_s, progress)
                continue
            waiting.remove(chosen)
            run.num_in_flight += 1
            ready_s = run.ready_s(chosen)
            assert ready_s is not None, "_next returns only requests that are ready"
            threading.Thread(target=_serve_one, args=(run, target, chosen, ready_s, options, timeout_s),
                             daemon=True).start()
    wall_s = max((result.finished_s for result in run.results), default=run.now_s())
    return DispatchOutcome(tuple(run.results), tuple(run.failures), wall_s)


def _maybe_report(run: _Run, num_requests: int, next_report_s: float, progress: Progress) -> float:
    elapsed_s = run.now_s()
    if elapsed_s < next_report_s:
        return next_report_s
    progress(progress_line(len(run.results) + len(run.failures), num_requests, elapsed_s))
    return elapsed_s + _PROGRESS_EVERY_S


def progress_line(num_done: int, num_requests: int, elapsed_s: float) -> str:
    """``done/total requests answered (elapsed), ETA`` at the pace so far (none before the first answer)."""
    line = f"{num_done}/{num_requests} requests answered ({elapsed_s:.0f} s)"
    if num_done:
        line += f", ETA {elapsed_s * (num_requests - num_done) / num_done:.0f} s"
    return line
