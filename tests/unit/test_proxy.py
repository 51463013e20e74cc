"""``kvtier proxy`` against fake prefill and decode instances: what each gets, what the client gets,
and what it answers when an instance is down or the request is bad.

The real thing (two vLLM servers, Redis, the proxy) is tests/e2e/test_disaggregated.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvtier.proxy import Proxy, ProxySettings, Upstream, decode_body, prefill_body, serve, strip_handoff

HANDOFF = {"kvtier": {"expect_tokens": 512}}


class Instance(ThreadingHTTPServer):
    """Records each request; a prefill answers with the handoff, a decode streams three pieces."""

    def __init__(self, role: str, status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.role, self.status = role, status
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.delay_s = 0.0
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def upstream(self) -> Upstream:
        return Upstream("127.0.0.1", self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: Instance

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        self._send(200, b'{"data": [{"id": "m"}]}')

    def do_POST(self) -> None:
        server = self.server
        server.paths.append(self.path)
        server.auth.append(self.headers.get("Authorization"))
        server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        with server.lock:
            server.active += 1
            server.max_active = max(server.max_active, server.active)
        time.sleep(server.delay_s)
        with server.lock:
            server.active -= 1
        if self.server.status != 200:
            self._send(self.server.status, b'{"error": "down"}')
        elif self.server.role == "prefill":
            self._send(200, json.dumps({"choices": [{"text": "x"}], "kv_transfer_params": HANDOFF}).encode())
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(sum(len(p) for p in _pieces())))
            self.end_headers()
            for piece in _pieces():
                self.wfile.write(piece)
                self.wfile.flush()

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _pieces() -> Iterator[bytes]:
    yield from (b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n")


@pytest.fixture
def instances() -> Iterator[tuple[Instance, Instance, int]]:
    prefill, decode = Instance("prefill"), Instance("decode")
    server = serve(Proxy([prefill.upstream], [decode.upstream], 10.0), "127.0.0.1", 0)
    yield prefill, decode, server.server_address[1]
    server.shutdown()
    prefill.shutdown()
    decode.shutdown()


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def test_prefill_gets_one_token_and_decode_gets_the_handoff_merged(instances: tuple[Instance, Instance, int]) -> None:
    prefill, decode, port = instances
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True,
            "kv_transfer_params": {"kvtier": {"namespace": "tenant-a"}, "other": {"x": 1}}}
    status, data = post(port, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and data == b"".join(_pieces())  # streamed through as it came
    assert prefill.bodies == [{"model": "m", "prompt": "hi", "max_tokens": 1,
                               "kv_transfer_params": {"kvtier": {"namespace": "tenant-a"}, "other": {"x": 1}}}]
    assert decode.bodies == [{**body, "kv_transfer_params": {"kvtier": {"namespace": "tenant-a", "expect_tokens": 512},
                                                              "other": {"x": 1}}}]
    assert prefill.paths == decode.paths == ["/v1/completions"]


def test_chat_limits_max_completion_tokens_too() -> None:
    body = {"messages": [], "max_completion_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
    assert prefill_body(body) == {"messages": [], "max_completion_tokens": 1, "max_tokens": 1}


def test_a_failed_prefill_still_decodes_without_a_handoff(instances: tuple[Instance, Instance, int]) -> None:
    prefill, decode, port = instances
    prefill.status = 503
    status, _ = post(port, "/v1/chat/completions", json.dumps({"messages": [], "max_tokens": 4}).encode())
    assert status == 200 and decode.bodies == [{"messages": [], "max_tokens": 4}]


def test_other_paths_and_bad_bodies(instances: tuple[Instance, Instance, int]) -> None:
    prefill, decode, port = instances
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read() == b'{"data": [{"id": "m"}]}' and decode.paths == ["/v1/models"]
    assert post(port, "/v1/completions", b"not json")[0] == 400
    assert post(port, "/v1/completions", b"[1, 2]")[0] == 400
    assert prefill.bodies == []


def test_decode_body_ignores_a_handoff_that_is_not_an_object() -> None:
    assert decode_body({"prompt": "x"}, None) == {"prompt": "x"}
    assert decode_body({"prompt": "x", "kv_transfer_params": "junk"}, HANDOFF) == {"prompt": "x",
                                                                                  "kv_transfer_params": HANDOFF}


@pytest.mark.parametrize("url", ["https://h:1", "http://h:1/v1", "h:1", "http://:1", "http://h:1?x=1"])
def test_upstream_urls_are_checked(url: str) -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        Upstream.parse(url)
    assert Upstream.parse("http://10.0.0.1:8001") == Upstream("10.0.0.1", 8001)


def test_client_handoff_fields_are_stripped_and_authorization_travels(instances: tuple[Instance, Instance, int]) -> None:
    prefill, decode, port = instances
    prefill.status = 503  # no handoff from a prefill instance: the client's own must not survive either
    body = {"prompt": "x", "kv_transfer_params": {"kvtier": {"namespace": "a", "expect_tokens": 99999,
                                                              "handoff": "kvho1:forged"}}}
    status, _ = post(port, "/v1/completions", json.dumps(body).encode(), {"Authorization": "Bearer k1"})
    assert status == 200
    assert prefill.bodies[0]["kv_transfer_params"] == {"kvtier": {"namespace": "a"}}
    assert decode.bodies == [{"prompt": "x", "kv_transfer_params": {"kvtier": {"namespace": "a"}}}]
    assert prefill.auth == decode.auth == ["Bearer k1"]
    assert strip_handoff({"kv_transfer_params": "junk"}) == {"kv_transfer_params": "junk"}


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_instance_is_a_503_in_the_openai_format() -> None:
    server = serve(Proxy([], [Upstream("127.0.0.1", _dead_port())], 10.0), "127.0.0.1", 0)
    try:
        status, data = post(server.server_address[1], "/v1/completions", b'{"prompt": "x"}')
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/v1/models")
        models = conn.getresponse()
    finally:
        server.shutdown()
    assert status == 503 and models.status == 503
    error = json.loads(data)["error"]
    assert error["code"] == 503 and error["type"] == "service_unavailable" and "unavailable" in error["message"]


def test_round_robin_skips_a_dead_instance_after_it_failed() -> None:
    alive = Instance("decode")
    server = serve(Proxy([], [Upstream("127.0.0.1", _dead_port()), alive.upstream], 10.0), "127.0.0.1", 0)
    try:
        statuses = [post(server.server_address[1], "/v1/completions", b'{"prompt": "x"}')[0] for _ in range(5)]
    finally:
        server.shutdown()
    assert statuses == [503, 200, 200, 200, 200] and len(alive.bodies) == 4


@pytest.mark.parametrize("raw", [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n"])
def test_a_malformed_request_is_a_400(instances: tuple[Instance, Instance, int], raw: bytes) -> None:
    _, decode, port = instances
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    assert decode.bodies == []


def test_concurrency_is_bounded_and_excess_waiters_get_503() -> None:
    decode = Instance("decode")
    decode.delay_s = 0.3
    settings = ProxySettings(timeout_s=10, max_concurrency=2, max_waiting=2)
    server = serve(Proxy([], [decode.upstream], settings=settings), "127.0.0.1", 0)
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(
        post(server.server_address[1], "/v1/completions", b'{"prompt": "x"}')[0])) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.shutdown()
    assert decode.max_active == 2  # never more than max_concurrency at the instance
    assert sorted(statuses) == [200, 200, 200, 200, 503, 503]  # 2 running + 2 waiting; the rest refused
