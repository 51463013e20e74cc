"""``kvtier proxy``: one OpenAI-compatible endpoint in front of prefill and decode instances.

For each completion or chat request the proxy:
1. sends it to a prefill instance (``kv_role: kv_producer``) with one output token and no
   streaming; the answer's ``kv_transfer_params`` hold kvtier's handoff
   (``{"kvtier": {"expect_tokens": N}}``);
2. sends the original request to a decode instance (``kv_role: kv_consumer``) with the handoff
   merged into its own ``kv_transfer_params`` (the client's kvtier controls, such as its
   namespace, are kept); the decode instance waits for those chunks in the shared remote tier and
   loads them;
3. relays the decode instance's answer as it comes (streamed or not).
Instances are used round-robin. If the prefill step fails, the request still goes to a decode
instance, which then computes the prompt itself: slower, never wrong. Other paths (``/v1/models``,
``/health``) go to a decode instance. Stdlib only; nothing here imports vLLM or the kvtier engine
code. It listens on loopback by default and adds no authentication: put it where vLLM's own
server would be.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("kvtier.proxy")

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 64 << 20
RELAY_CHUNK_BYTES = 64 << 10
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass(frozen=True)
class Upstream:
    """One instance: ``http://host:port`` (no path)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """``ValueError`` for anything but ``http://host:port``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"expected http://host:port, got {url!r}")
        return cls(parts.hostname, parts.port or 80)

    def connect(self, timeout_s: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)


def prefill_body(body: Mapping[str, object]) -> dict[str, object]:
    """The request a prefill instance gets: one token, not streamed."""
    out = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: Mapping[str, object], handoff: object) -> dict[str, object]:
    """The original request with the prefill's ``kv_transfer_params`` merged in: its ``kvtier``
    section over the client's (the client's other keys and sections are kept). A handoff that is
    not an object is ignored."""
    out = dict(body)
    if not isinstance(handoff, Mapping):
        return out
    client = body.get("kv_transfer_params")
    params = dict(client) if isinstance(client, Mapping) else {}
    for section, value in handoff.items():
        if isinstance(value, Mapping) and isinstance(params.get(section), Mapping):
            params[section] = {**params[section], **value}
        else:
            params[section] = value
    out["kv_transfer_params"] = params
    return out


class Proxy:
    """Round-robin over the instances; one ``handle`` per client request, from any thread."""

    def __init__(self, prefill: Sequence[Upstream], decode: Sequence[Upstream], timeout_s: float) -> None:
        if not prefill or not decode:
            raise ValueError("a proxy needs at least one prefill and one decode instance")
        self._prefill = itertools.cycle(prefill)
        self._decode = itertools.cycle(decode)
        self._lock = threading.Lock()
        self.timeout_s = timeout_s

    def next_prefill(self) -> Upstream:
        with self._lock:
            return next(self._prefill)

    def next_decode(self) -> Upstream:
        with self._lock:
            return next(self._decode)

    def handoff(self, body: Mapping[str, object], path: str) -> object:
        """Run the prefill step; its ``kv_transfer_params`` (None when it failed)."""
        upstream = self.next_prefill()
        try:
            conn = upstream.connect(self.timeout_s)
            try:
                conn.request("POST", path, json.dumps(prefill_body(body)), {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            finally:
                conn.close()
        except OSError as exc:
            logger.warning("kvtier proxy: prefill instance %s:%d failed: %s; decoding without a handoff",
                           upstream.host, upstream.port, exc)
            return None
        if response.status != 200:
            logger.warning("kvtier proxy: prefill instance %s:%d answered %d; decoding without a handoff",
                           upstream.host, upstream.port, response.status)
            return None
        try:
            return json.loads(data).get("kv_transfer_params")
        except (ValueError, AttributeError):
            return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._error(400 if length <= 0 else 413, "a JSON body of at most 64 MiB is required")
            return
        raw = self.rfile.read(length)
        path = urllib.parse.urlsplit(self.path).path
        if path not in COMPLETION_PATHS:
            self._relay("POST", raw)
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "the body is not JSON")
            return
        if not isinstance(body, dict):
            self._error(400, "the body must be a JSON object")
            return
        handoff = self.server.proxy.handoff(body, path)
        self._relay("POST", json.dumps(decode_body(body, handoff)).encode())

    def do_GET(self) -> None:  # noqa: N802
        self._relay("GET", None)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("kvtier proxy: " + format, *args)

    def _relay(self, method: str, body: bytes | None) -> None:
        upstream = self.server.proxy.next_decode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            conn = upstream.connect(self.server.proxy.timeout_s)
            try:
                conn.request(method, self.path, body, headers)
                response = conn.getresponse()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_HEADERS:
                        self.send_header(name, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in _pieces(response):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            finally:
                conn.close()
        except OSError as exc:
            logger.warning("kvtier proxy: decode instance %s:%d failed: %s", upstream.host, upstream.port, exc)
            self.close_connection = True

    def _error(self, status: int, message: str) -> None:
        data = json.dumps({"error": {"message": message, "code": status}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _pieces(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        piece = response.read1(RELAY_CHUNK_BYTES)
        if not piece:
            return
        yield piece


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], proxy: Proxy) -> None:
        super().__init__(address, _Handler)
        self.proxy = proxy


def serve(proxy: Proxy, host: str, port: int) -> _Server:
    """Start serving on a daemon thread; the caller stops it with ``shutdown()``. Raises OSError
    when the port is taken."""
    server = _Server((host, port), proxy)
    threading.Thread(target=server.serve_forever, name="kvtier-proxy", daemon=True).start()
    return server
