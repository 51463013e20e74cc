"""The request dispatcher and the ``--url`` path of ``kvtier bench`` against a fake streaming server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvtier.bench.client import RequestOptions, served_model
from kvtier.bench.dispatch import Target, dispatch
from kvtier.bench.runner import ExternalServer, RunSettings, run_external
from kvtier.bench.specs import BenchRequest, ChatPrompt, ModelInfo, TokenPrompt, Workload
from kvtier.bench.stats import summarize_run

CHUNK_DELAY_S = 0.02


class FakeServer(ThreadingHTTPServer):
    """Streams ``max_tokens`` chunks per request; counts requests in flight; a prompt of [13] fails."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.num_hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, json.dumps({"data": [{"id": "fake-model"}]}).encode())
        else:  # /metrics: every request so far was a memory hit of one chunk
            text = (f'kvtier_hits_total{{tier="memory"}} {self.server.num_hits}\n'
                    f'kvtier_misses_total{{tier="memory"}} 0\nkvtier_lookup_chunks_total {self.server.num_hits}\n')
            self._send(200, text.encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            if body.get("prompt") == [13]:
                self._send(500, b"boom")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for line in self._events(body):
                if line == "[DONE]":  # done before the client can know it: it may send the next one
                    self._leave()
                self.wfile.write(f"data: {line}\n\n".encode())
                self.wfile.flush()
        finally:
            self._leave()

    def _leave(self) -> None:
        with self.server.lock:
            if not getattr(self, "left", False):
                self.left = True
                self.server.in_flight -= 1

    def _events(self, body: dict) -> Iterator[str]:
        chat = "messages" in body
        for _ in range(body["max_tokens"]):
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            yield json.dumps({"choices": [choice]})
            time.sleep(CHUNK_DELAY_S)
        with self.server.lock:
            self.server.num_hits += 1
        usage = {"prompt_tokens": 10, "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 4}}
        yield json.dumps({"choices": [], "usage": usage})
        yield "[DONE]"

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.shutdown()
    fake.server_close()


def token_request(index: int, arrival_s: float, after: int | None = None,
                  tokens: tuple[int, ...] = (1, 2)) -> BenchRequest:
    return BenchRequest(index, arrival_s, after, 1, TokenPrompt(tokens), max_tokens=5)


def test_streams_are_timed_and_options_sent(server: FakeServer) -> None:
    chat = BenchRequest(1, 0.0, None, 2, ChatPrompt((("user", "hi"),)), max_tokens=4)
    outcome = dispatch(Target(server.url, "m"), (token_request(0, 0.0), chat),
                       RequestOptions(ignore_eos=True, cache_salt="s1"), 4, 10.0, print)
    assert not outcome.failures and len(outcome.results) == 2
    by_index = {r.index: r for r in outcome.results}
    assert len(by_index[0].itl_s) == 4 and len(by_index[1].itl_s) == 3  # n tokens, n - 1 gaps
    assert all(gap >= CHUNK_DELAY_S * 0.8 for r in outcome.results for gap in r.itl_s)
    assert by_index[1].round == 2 and by_index[1].num_cached_tokens == 4 and by_index[1].num_completion_tokens == 4
    assert all(0 < r.ttft_s < r.total_s for r in outcome.results)
    assert all(b["ignore_eos"] is True and b["cache_salt"] == "s1" for b in server.bodies)


def test_arrivals_dependencies_and_concurrency(server: FakeServer) -> None:
    requests = (token_request(0, 0.0), token_request(1, 0.0, after=0), token_request(2, 0.3),
                *(token_request(i, 0.5) for i in range(3, 8)))
    outcome = dispatch(Target(server.url, "m"), requests, RequestOptions(), 2, 10.0, print)
    by_index = {r.index: r for r in outcome.results}
    assert by_index[1].sent_s >= by_index[0].finished_s  # waited for its predecessor
    assert by_index[2].sent_s >= 0.3
    assert server.max_in_flight <= 2
    assert outcome.wall_s == pytest.approx(max(r.finished_s for r in outcome.results))


def test_a_failed_request_is_recorded_not_raised(server: FakeServer) -> None:
    outcome = dispatch(Target(server.url, "m"), (token_request(0, 0.0, tokens=(13,)), token_request(1, 0.0, after=0)),
                       RequestOptions(), 4, 10.0, print)
    assert [f.index for f in outcome.failures] == [0] and "HTTP 500" in outcome.failures[0].error
    assert [r.index for r in outcome.results] == [1]  # its successor was still sent


def test_external_server_is_measured(server: FakeServer, tmp_path) -> None:
    assert served_model(server.url, 5) == "fake-model"
    workload = Workload("t", tuple(token_request(i, 0.0) for i in range(3)), (), has_rounds=False)
    settings = RunSettings(out_dir=str(tmp_path), log_dir=str(tmp_path), repeats=2, order="interleaved",
                           max_concurrency=2, request_timeout_s=10, startup_timeout_s=10, engine_kv_tokens=4096,
                           warmup_tokens=8, settle_s=0.0)
    external = ExternalServer("ext", server.url, f"{server.url}/metrics", pid=None)
    runs = run_external(external, workload, ModelInfo("/m", 1000, 2048), settings, print)
    assert len(runs) == 1 and len(runs[0].repeats) == 2 and runs[0].warmup_requests_s is not None
    assert {b["cache_salt"] for b in server.bodies[1:4]} != {b["cache_salt"] for b in server.bodies[4:]}
    summary = summarize_run(runs[0])
    assert summary.metrics["num_requests"].median == 3
    assert summary.metrics["hit_rate_memory"].median == 1.0  # counted per repeat, not since start
    assert "cpu_s" not in summary.metrics  # no pid: not measured, not made up
    assert server.bodies[0]["model"] == "fake-model"


def test_a_concurrency_limit_keeps_first_come_first_served(server: FakeServer) -> None:
    # 3 chat users x 2 rounds, all arriving at once, one at a time: round robin, never a user's
    # second turn before every first turn (that would let the engine's own cache serve it)
    requests = tuple(token_request(round_ * 3 + user, 0.0, after=None if round_ == 0 else user)
                     for round_ in range(2) for user in range(3))
    outcome = dispatch(Target(server.url, "m"), requests, RequestOptions(), 1, 10.0, print)
    assert [r.index for r in sorted(outcome.results, key=lambda r: r.sent_s)] == [0, 1, 2, 3, 4, 5]


def test_progress_line_has_an_eta_at_the_pace_so_far() -> None:
    from kvtier.bench.dispatch import progress_line

    assert progress_line(0, 10, 4.0) == "0/10 requests answered (4 s)"
    assert progress_line(2, 10, 30.0) == "2/10 requests answered (30 s), ETA 120 s"
    assert progress_line(10, 10, 50.0).endswith("ETA 0 s")


def test_ttft_is_timed_from_the_arrival_and_the_lag_is_reported(server: FakeServer) -> None:
    # one slot: requests 0 and 1 arrive together, so 1 waits for 0 (lag about 0's whole stream);
    # request 2 arrives long after both are done (no lag); 3 follows 2 (ready when 2 finished)
    requests = (token_request(0, 0.0), token_request(1, 0.0), token_request(2, 0.6), token_request(3, 0.0, after=2))
    outcome = dispatch(Target(server.url, "m"), requests, RequestOptions(), 1, 10.0, print)
    by_index = {r.index: r for r in outcome.results}
    first, waited, late, follower = (by_index[i] for i in range(4))
    assert waited.sent_s >= first.finished_s and waited.ready_s == pytest.approx(0.0, abs=1e-9)
    assert waited.lag_s == pytest.approx(waited.sent_s) and waited.lag_s >= 4 * CHUNK_DELAY_S
    assert waited.ttft_s > waited.lag_s  # the wait for a slot counts in TTFT (the fake server answers at once)
    assert late.ready_s == pytest.approx(0.6, abs=1e-9) and late.lag_s < 0.05 and late.sent_s >= 0.6
    assert follower.ready_s >= late.finished_s - 0.05 and follower.lag_s < 0.05
    assert all(r.ttft_s > r.lag_s for r in outcome.results)
    metrics = summarize_run(_run_of(outcome)).metrics
    lags = [r.lag_s for r in outcome.results]
    assert metrics["lag_max_s"].median == pytest.approx(max(lags))
    assert metrics["lag_mean_s"].median == pytest.approx(sum(lags) / 4)


def _run_of(outcome):  # one repeat of one configuration
    from kvtier.bench.runner import ConfigRun, RepeatMeasure

    return ConfigRun("vllm", False, None, repeats=[RepeatMeasure(1, outcome, None, None)])


def test_the_advisors_calibration_takes_the_lag_out() -> None:
    from kvtier.advisor.timing import median_points

    rows = [{"index": 0, "num_prompt_tokens": 100, "num_cached_tokens": 0, "ttft_s": 0.5, "lag_s": 0.3},
            {"index": 0, "num_prompt_tokens": 100, "num_cached_tokens": 0, "ttft_s": 0.25}]  # an older file
    assert median_points(rows) == [(100.0, 0.0, pytest.approx(0.225))]
