"""Send a workload's requests at their arrival times, concurrently, and time each one.

Each request is sent at its ``arrival_s`` (after the start of the repeat), or when the request it
waits for (``after``) has finished, whichever is later, and only while fewer than
``max_concurrency`` requests are in flight. TTFT and inter-token gaps are measured from the moment
it is sent. A request that fails is recorded as a failure (its error text), never retried; a
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
    ttft_s: float
    total_s: float
    itl_s: tuple[float, ...]  # gaps between consecutive content chunks of the stream
    num_prompt_tokens: int
    num_cached_tokens: int | None
    num_completion_tokens: int

    @property
    def finished_s(self) -> float:
        return self.sent_s + self.total_s


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
    """The shared state of one dispatch: finished events, results, a concurrency gate."""

    def __init__(self, requests: tuple[BenchRequest, ...], max_concurrency: int) -> None:
        self.finished = {request.index: threading.Event() for request in requests}
        self.gate = threading.BoundedSemaphore(max_concurrency)
        self.lock = threading.Lock()
        self.results: list[RequestResult] = []
        self.failures: list[RequestFailure] = []
        self.started_s = time.perf_counter()

    def add_result(self, result: RequestResult) -> None:
        with self.lock:
            self.results.append(result)

    def add_failure(self, failure: RequestFailure) -> None:
        with self.lock:
            self.failures.append(failure)

    @property
    def num_done(self) -> int:
        with self.lock:
            return len(self.results) + len(self.failures)


def _serve_one(run: _Run, target: Target, request: BenchRequest, options: RequestOptions, timeout_s: float) -> None:
    try:
        if request.after is not None:
            run.finished[request.after].wait()
        with run.gate:
            sent_s = time.perf_counter() - run.started_s
            try:
                answer = send(target, request, options, timeout_s)
            except ServerError as exc:
                run.add_failure(RequestFailure(request.index, str(exc)))
                return
        run.add_result(RequestResult(request.index, request.round, sent_s, answer.ttft_s, answer.total_s,
                                 chunk_gaps(answer.chunk_times_s), answer.num_prompt_tokens,
                                 answer.num_cached_tokens, answer.num_completion_tokens))
    finally:
        run.finished[request.index].set()


def dispatch(target: Target, requests: tuple[BenchRequest, ...], options: RequestOptions, max_concurrency: int,
             timeout_s: float, progress: Progress) -> DispatchOutcome:
    """Send every request (see the module docstring) and wait for all answers. Blocks the caller;
    one thread per request in flight or waiting. ``progress`` gets a line every few seconds."""
    run = _Run(requests, max_concurrency)
    threads = []
    next_report_s = _PROGRESS_EVERY_S
    for request in sorted(requests, key=lambda r: (r.arrival_s, r.index)):
        while (delay_s := request.arrival_s - (time.perf_counter() - run.started_s)) > 0:
            time.sleep(min(delay_s, 0.5))
            next_report_s = _maybe_report(run, len(requests), next_report_s, progress)
        thread = threading.Thread(target=_serve_one, args=(run, target, request, options, timeout_s), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)
            next_report_s = _maybe_report(run, len(requests), next_report_s, progress)
    finished = [result.finished_s for result in run.results]
    wall_s = max(finished, default=time.perf_counter() - run.started_s)
    return DispatchOutcome(tuple(run.results), tuple(run.failures), wall_s)


def _maybe_report(run: _Run, num_requests: int, next_report_s: float, progress: Progress) -> float:
    elapsed_s = time.perf_counter() - run.started_s
    if elapsed_s < next_report_s:
        return next_report_s
    progress(f"{run.num_done}/{num_requests} requests answered ({elapsed_s:.0f} s)")
    return elapsed_s + _PROGRESS_EVERY_S
