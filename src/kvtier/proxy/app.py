"""The proxy's HTTP side: a FastAPI app relaying to the instances through pooled httpx clients.

For each completion or chat request:
1. the client's kvtier handoff fields are stripped (``bodies.strip_handoff``);
2. with prefill instances: the request goes to one of them with one output token, not streamed;
   the answer's ``kv_transfer_params`` hold kvtier's handoff (``{"kvtier": {"expect_tokens": N}}``,
   plus ``"handoff"``, signed by the prefill engine, when it has a signing key); a failed prefill
   degrades to a plain decode;
3. the request (with the handoff merged in) goes to the instance the router picks, whose answer is
   relayed as it comes (streamed or not).
Other paths (``/v1/models``, ``/health``, ...) go to the router's pick without a body change. The
client's ``Authorization`` header travels to every instance (vLLM's ``--api-key`` works behind
the proxy). An instance that cannot be reached is a 503, one that fails mid-answer a 502, both in
the OpenAI error format; at most ``max_concurrency`` requests are relayed at once, up to
``max_waiting`` more wait, and beyond that the proxy answers 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvtier.proxy.bodies import Upstream, decode_body, openai_error, prefill_body, strip_handoff
from kvtier.proxy.routing import RoundRobin, Router

logger = logging.getLogger("kvtier.proxy")

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 64 << 20
CONNECT_TIMEOUT_S = 5.0
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection",
                "te", "trailer", "upgrade"}
_FORWARDED_HEADERS = ("authorization", "accept", "x-request-id")

@dataclass(frozen=True)
class ProxySettings:
    """``timeout_s``: per request to an instance; at most ``max_concurrency`` requests are
    relayed at once and ``max_waiting`` more wait."""

    timeout_s: float = 600.0
    max_concurrency: int = 256
    max_waiting: int = 1024


class ProxyError(Exception):
    """An answer the proxy gives itself, in the OpenAI error format."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> JSONResponse:
        return JSONResponse(openai_error(self.status, str(self)), status_code=self.status)


class Proxy:
    """Routing and relaying for one proxy process (its event loop); see the module docstring."""

    def __init__(self, prefill: Sequence[Upstream], decode: Sequence[Upstream], timeout_s: float = 600.0,
                 settings: ProxySettings | None = None, router: Router | None = None) -> None:
        if not decode:
            raise ValueError("a proxy needs at least one decode instance")
        settings = settings or ProxySettings(timeout_s=timeout_s)
        if settings.max_concurrency < 1 or settings.max_waiting < 0:
            raise ValueError("max_concurrency must be at least 1 and max_waiting at least 0")
        self.settings = settings
        self.prefill = RoundRobin(prefill) if prefill else None
        self.router = router or RoundRobin(decode)
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._num_waiting = 0

    # ----- lifecycle (on the server's event loop) ---------------------------------------------
    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self.settings.max_concurrency * 2,
                              max_keepalive_connections=self.settings.max_concurrency)
        timeout = httpx.Timeout(self.settings.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.settings.timeout_s))
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
        self._slots = asyncio.Semaphore(self.settings.max_concurrency)
        await self.router.start(self._client)

    async def stop(self) -> None:
        await self.router.stop()
        if self._client is not None:
            await self._client.aclose()

    # ----- requests ---------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Wait for a relay slot; ProxyError(503) when too many requests wait already."""
        assert self._slots is not None
        if self._slots.locked() and self._num_waiting >= self.settings.max_waiting:
            raise ProxyError(503, "the proxy is at its concurrency limit; retry later")
        self._num_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._num_waiting -= 1

    def release(self) -> None:
        assert self._slots is not None
        self._slots.release()

    async def completion(self, path: str, body: dict[str, object], headers: dict[str, str]) -> Response:
        body = strip_handoff(body)
        handoff = await self.handoff(path, body, headers) if self.prefill is not None else None
        target = await self.router.route(path, body, headers)
        return await self.relay(target, "POST", path, json.dumps(decode_body(body, handoff)).encode(), headers)

    async def relay(self, upstream: Upstream, method: str, path: str, body: bytes | None,
                    headers: dict[str, str]) -> Response:
        """``send`` the request on, telling the router when it ended (``Router.done``)."""
        try:
            response = await self.send(upstream, method, path, body, headers)
        except ProxyError:
            self.router.done(upstream)
            raise
        response.closers.append(lambda: self.router.done(upstream))
        return response

    async def handoff(self, path: str, body: Mapping[str, object], headers: dict[str, str]) -> object:
        """Run the prefill step; the ``kv_transfer_params`` to merge (None when it failed)."""
        assert self._client is not None and self.prefill is not None
        upstream = self.prefill.next()
        try:
            response = await self._client.post(upstream.url + path, content=json.dumps(prefill_body(body)).encode(),
                                               headers={**headers, "content-type": "application/json"})
        except httpx.HTTPError as exc:
            logger.warning("kvtier proxy: prefill instance %s failed: %r; decoding without a handoff", upstream, exc)
            return None
        if response.status_code != 200:
            logger.warning("kvtier proxy: prefill instance %s answered %d; decoding without a handoff",
                           upstream, response.status_code)
            return None
        try:
            return response.json().get("kv_transfer_params")
        except (ValueError, AttributeError):
            return None

    async def send(self, upstream: Upstream, method: str, path: str, body: bytes | None,
                   headers: dict[str, str]) -> _Relayed:
        """Send the request on and stream the answer back. ProxyError 503 (unreachable) or 502."""
        assert self._client is not None
        sent = dict(headers)
        if body is not None:
            sent["content-type"] = "application/json"
        request = self._client.build_request(method, upstream.url + path, content=body, headers=sent)
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            self.router.failed(upstream)
            raise ProxyError(503, f"instance {upstream} is unavailable: {exc!r}") from None
        except httpx.HTTPError as exc:
            self.router.failed(upstream)
            raise ProxyError(502, f"instance {upstream} failed: {exc!r}") from None
        kept = {name: value for name, value in response.headers.items() if name.lower() not in _HOP_HEADERS}
        return _Relayed(response, kept)


class _Relayed(StreamingResponse):
    """An instance's answer relayed piece by piece; the upstream response is closed however the
    client's side ends (finished, disconnected or failed)."""

    def __init__(self, upstream: httpx.Response, headers: dict[str, str]) -> None:
        super().__init__(_pieces(upstream), status_code=upstream.status_code, headers=headers)
        self._upstream = upstream
        self.closers: list[Callable[[], None]] = []  # called once the relay ended, however it ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._upstream.aclose()
            finally:
                for close in self.closers:
                    close()


async def _pieces(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for piece in response.aiter_raw():
            yield piece
    except httpx.HTTPError as exc:  # the headers are sent: all we can do is end the stream early
        logger.warning("kvtier proxy: the instance's answer broke off: %r", exc)


def forwarded_headers(request: Request) -> dict[str, str]:
    """The client's headers that travel to the instances."""
    return {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}


async def read_body(request: Request) -> bytes:
    """The body, at most ``MAX_BODY_BYTES``; ProxyError(413) beyond."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ProxyError(413, "the body is larger than 64 MiB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ProxyError(413, "the body is larger than 64 MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(proxy: Proxy) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.stop()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def handle(request: Request) -> Response:
        try:
            await proxy.acquire()
        except ProxyError as exc:
            return exc.response()
        released = False
        try:
            response = await _dispatch(proxy, request)
            if isinstance(response, _Relayed):  # the slot is held until the relay ends
                response.closers.append(proxy.release)
                released = True
            return response
        except ProxyError as exc:
            return exc.response()
        finally:
            if not released:
                proxy.release()

    return app


async def _dispatch(proxy: Proxy, request: Request) -> Response:
    headers = forwarded_headers(request)
    path = request.url.path
    target_path = path + (f"?{request.url.query}" if request.url.query else "")
    raw = await read_body(request) if request.method != "GET" else None
    if request.method == "POST" and path in COMPLETION_PATHS:
        try:
            body = json.loads(raw or b"")
        except ValueError:
            raise ProxyError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ProxyError(400, "the body must be a JSON object")
        return await proxy.completion(path, body, headers)
    target = await proxy.router.route(path, None, headers)
    return await proxy.relay(target, request.method, target_path, raw, headers)

