"""The admin API over HTTP (stdlib ``http.server``, one thread per connection, JSON in and out).

Endpoints (all under ``/v1``, all need ``Authorization: Bearer <token>``):

=======  ============================  =====  ==================================================
method   path                          role   does
=======  ============================  =====  ==================================================
GET      /v1/health                    read   ``{"status": "ok" | "degraded", ...}``
GET      /v1/stats                     read   entries per tier and per namespace
POST     /v1/lookup                    read   ``{"namespace", "token_ids", "salt"?}``: cached chunks per tier
GET      /v1/namespaces                read   TTL, quotas and usage per namespace
PUT      /v1/namespaces/<namespace>    admin  ``{"ttl_s"?, "memory_quota"?, "disk_quota"?}`` (sizes: bytes or "1GiB")
POST     /v1/invalidate                admin  ``{"namespace", "token_ids"? | "keys"?, "salt"?}``: remove from every tier
=======  ============================  =====  ==================================================

``GET /livez`` needs no token and says only ``{"status": "ok"}`` (for liveness probes).

A request without a valid token gets 401 before its body is read, a read token on an admin
endpoint 403; both are audited (unauthenticated ones at most ``DENIED_AUDIT_PER_MINUTE`` lines a
minute, then one line counting the rest), as are lookups, authenticated 404s and every admin
action with its outcome. At most ``MAX_CONNECTIONS`` connections are served at once (others are
closed), each request within ``REQUEST_TIMEOUT_S``. Bodies are JSON objects of at most
``MAX_BODY_BYTES``; anything else is a 400 with a reason; ``ttl_s`` and quotas are bounded. Nothing a client sends is executed or
unpickled; unknown fields are refused (a typo must not widen an invalidation to a whole
namespace, so ``token_ids`` and ``keys`` are exclusive and checked strictly).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvtier.admin.audit import AuditLog
from kvtier.admin.auth import Role, Tokens
from kvtier.admin.service import AdminService
from kvtier.config import NAMESPACE_RULE, NamespaceLimits, is_namespace, parse_size
from kvtier.errors import ConfigError

logger = logging.getLogger("kvtier")

MAX_BODY_BYTES = 8 << 20
MAX_TOKEN_IDS = 1 << 20
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
DENIED_AUDIT_PER_MINUTE = 60
MAX_TTL_S = 10 * 365 * 86400  # ten years
MAX_QUOTA_BYTES = 1 << 60
_KEY_HEX = re.compile(r"[0-9a-f]{32}")


class BadRequest(Exception):
    """A request the API refuses (400), with the reason sent back."""


@dataclass(frozen=True)
class _Route:
    role: Role
    audited: bool  # admin actions are audited with their outcome
    handler: Callable[["AdminAPI", Mapping[str, object], str], dict[str, object]]


class AdminAPI:
    """Request handling, independent of the socket: authentication, routing, validation."""

    def __init__(self, service: AdminService, tokens: Tokens, audit: AuditLog) -> None:
        self.service = service
        self.tokens = tokens
        self.audit = audit
        self._denied = _Budget(DENIED_AUDIT_PER_MINUTE, 60.0)

    def authenticated(self, authorization: str | None) -> bool:
        return self.tokens.authenticate(authorization) is not None

    def handle(self, method: str, path: str, authorization: str | None, body: bytes | None,
               client: str) -> tuple[int, dict[str, object]]:
        """``(HTTP status, JSON body)`` of one request."""
        principal = self.tokens.authenticate(authorization)
        route, argument = self._route(method, path)
        event: dict[str, object] = {"client": client, "method": method, "path": path[:200],
                                    "token_id": None if principal is None else principal.token_id,
                                    "role": None if principal is None else principal.role.name.lower()}
        if principal is None:
            reason = "missing or unknown bearer token"
            suppressed = self._denied.take()
            if suppressed is not None:  # unauthenticated clients must not grow the log without bound
                if suppressed:
                    self.audit.record({"denied_unlogged": suppressed, "status": int(HTTPStatus.UNAUTHORIZED)})
                return self._deny(event, HTTPStatus.UNAUTHORIZED, reason)
            return HTTPStatus.UNAUTHORIZED, {"error": reason}
        if route is None:
            answer = {"error": f"no endpoint {method} {path[:200]}"}
            self.audit.record({**event, "status": int(HTTPStatus.NOT_FOUND), "detail": answer})
            return HTTPStatus.NOT_FOUND, answer
        if principal.role < route.role:
            return self._deny(event, HTTPStatus.FORBIDDEN, f"needs an {route.role.name.lower()} token")
        try:
            request = _json_object(body) if method in ("POST", "PUT") else {}
            status, answer = HTTPStatus.OK, route.handler(self, request, argument)
        except BadRequest as exc:
            status, answer = HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except Exception:  # a bug must answer 500, not kill the server thread silently
            logger.exception("kvtier: admin API %s %s failed", method, path)
            status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the engine log"}
        if route.audited:
            self.audit.record({**event, "status": int(status), "detail": answer})
        return status, answer

    def _deny(self, event: dict[str, object], status: HTTPStatus, reason: str) -> tuple[int, dict[str, object]]:
        self.audit.record({**event, "status": int(status), "denied": reason})
        return status, {"error": reason}

    @staticmethod
    def _route(method: str, path: str) -> tuple[_Route | None, str]:
        path = path.split("?", 1)[0]
        if path.startswith("/v1/namespaces/") and method == "PUT":
            return _ROUTES["PUT /v1/namespaces/"], path[len("/v1/namespaces/"):]
        return _ROUTES.get(f"{method} {path}"), ""

    # ----- handlers ----------------------------------------------------------------------------
    def _health(self, request: Mapping[str, object], argument: str) -> dict[str, object]:
        return self.service.health()

    def _stats(self, request: Mapping[str, object], argument: str) -> dict[str, object]:
        return self.service.stats()

    def _lookup(self, request: Mapping[str, object], argument: str) -> dict[str, object]:
        _only(request, {"namespace", "token_ids", "salt"})
        token_ids = _token_ids(request.get("token_ids"))
        return self.service.lookup(_namespace(request.get("namespace")), _salt(request.get("salt")), token_ids)

    def _namespaces(self, request: Mapping[str, object], argument: str) -> dict[str, object]:
        return {"namespaces": self.service.namespaces()}

    def _set_limits(self, request: Mapping[str, object], argument: str) -> dict[str, object]:
        _only(request, {"ttl_s", "memory_quota", "disk_quota"})
        namespace = _namespace(argument)
        current = self.service.current_limits(namespace)
        limits = NamespaceLimits(
            ttl_s=_non_negative_int(request["ttl_s"], "ttl_s", MAX_TTL_S) if "ttl_s" in request else current.ttl_s,
            memory_bytes=_size(request["memory_quota"], "memory_quota") if "memory_quota" in request
            else current.memory_bytes,
            disk_bytes=_size(request["disk_quota"], "disk_quota") if "disk_quota" in request else current.disk_bytes)
        return self.service.set_limits(namespace, limits)

    def _invalidate(self, request: Mapping[str, object], argument: str) -> dict[str, object]:
        _only(request, {"namespace", "token_ids", "keys", "salt"})
        namespace = _namespace(request.get("namespace"))
        if "token_ids" in request and "keys" in request:
            raise BadRequest("give token_ids or keys, not both (neither: the whole namespace)")
        if "salt" in request and "token_ids" not in request:
            raise BadRequest("salt goes with token_ids")
        keys: list[bytes] | None = None
        if "token_ids" in request:
            keys = self.service.keys_of(namespace, _salt(request.get("salt")), _token_ids(request["token_ids"]))
            if not keys:
                raise BadRequest(f"token_ids hold no full chunk ({self.service.shape.chunk_tokens} tokens)")
        elif "keys" in request:
            keys = _keys(request["keys"])
        report = self.service.invalidate(namespace, keys)
        if keys is not None:
            report["scope"] = "prefix" if "token_ids" in request else "keys"
            report["keys"] = len(keys)
        return report


_ROUTES: dict[str, _Route] = {
    "GET /v1/health": _Route(Role.READ, False, AdminAPI._health),
    "GET /v1/stats": _Route(Role.READ, False, AdminAPI._stats),
    "POST /v1/lookup": _Route(Role.READ, True, AdminAPI._lookup),  # reveals what is cached: audited
    "GET /v1/namespaces": _Route(Role.READ, False, AdminAPI._namespaces),
    "PUT /v1/namespaces/": _Route(Role.ADMIN, True, AdminAPI._set_limits),
    "POST /v1/invalidate": _Route(Role.ADMIN, True, AdminAPI._invalidate),
}


class _Budget:
    """At most ``limit`` events per ``window_s``; ``take`` says whether this one is within the
    budget: None when it is not, else the number refused since the budget was last open."""

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit, self._window_s = limit, window_s
        self._start, self._used, self._refused = time.monotonic(), 0, 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= self._window_s:
                self._start, self._used = now, 0
            if self._used >= self._limit:
                self._refused += 1
                return None
            self._used += 1
            refused, self._refused = self._refused, 0
            return refused


class _BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``MAX_CONNECTIONS`` connections at once and
    closes any beyond (an unauthenticated client cannot tie up threads without bound)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class AdminServer:
    """Serves an ``AdminAPI`` on ``host:port`` from daemon threads."""

    def __init__(self, api: AdminAPI, host: str, port: int) -> None:
        """Binds at once: raises ``ConfigError("admin.port", ...)`` when the address is taken."""
        self._api = api
        handler = _handler_for(api)
        try:
            self._server = _BoundedServer((host, port), handler)
        except OSError as exc:
            raise ConfigError("admin.port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvtier-admin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, then release the service's handles and the audit log."""
        self._server.shutdown()
        self._server.server_close()
        self._api.service.close()
        self._api.audit.close()


def _handler_for(api: AdminAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvtier-admin"
        sys_version = ""
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._answer("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._answer("DELETE")

        def _answer(self, method: str) -> None:
            if method == "GET" and self.path.split("?", 1)[0] == "/livez":
                self._send(HTTPStatus.OK, {"status": "ok"})  # no token, nothing revealed
                return
            authorization = self.headers.get("Authorization")
            if not api.authenticated(authorization):  # refused before its body is read
                self.close_connection = True
                status, answer = api.handle(method, self.path, authorization, None, self.client_address[0])
                self._send(status, answer)
                return
            body: bytes | None = None
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.BAD_REQUEST,
                           {"error": f"Content-Length must be 0..{MAX_BODY_BYTES}"})
                return
            if length:
                body = self.rfile.read(length)
            status, answer = api.handle(method, self.path, self.headers.get("Authorization"), body,
                                        self.client_address[0])
            self._send(status, answer)

        def _send(self, status: int, answer: Mapping[str, object]) -> None:
            data = json.dumps(answer, sort_keys=True).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", 'Bearer realm="kvtier"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            logger.debug("kvtier admin: " + format, *args)

    return Handler


# ----- validation ----------------------------------------------------------------------------------

def _json_object(body: bytes | None) -> Mapping[str, object]:
    if not body:
        raise BadRequest("the body must be a JSON object")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def _only(request: Mapping[str, object], known: set[str]) -> None:
    unknown = sorted(set(request) - known)
    if unknown:
        raise BadRequest(f"unknown fields {unknown[:5]} (known: {sorted(known)})")


def _namespace(value: object) -> str:
    if not is_namespace(value):
        raise BadRequest(f"namespace must be {NAMESPACE_RULE}")
    assert isinstance(value, str)
    return value


def _salt(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 1024:
        raise BadRequest("salt must be a string of at most 1024 characters")
    return value


def _token_ids(value: object) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > MAX_TOKEN_IDS:
        raise BadRequest(f"token_ids must be a non-empty list of at most {MAX_TOKEN_IDS} token ids")
    if not all(type(token) is int and 0 <= token < 2**32 for token in value):
        raise BadRequest("token_ids must be integers in 0..2^32-1")
    return value


def _keys(value: object) -> list[bytes]:
    if not isinstance(value, list) or not value or len(value) > 100_000:
        raise BadRequest("keys must be a non-empty list of at most 100000 chunk keys")
    if not all(isinstance(key, str) and _KEY_HEX.fullmatch(key) for key in value):
        raise BadRequest("keys must be chunk keys: 32 lowercase hex digits")
    return [bytes.fromhex(key) for key in value]


def _non_negative_int(value: object, name: str, most: int) -> int:
    if type(value) is not int or not 0 <= value <= most:
        raise BadRequest(f"{name} must be an integer in 0..{most} (0: none)")
    return value


def _size(value: object, name: str) -> int:
    if type(value) is int:
        size = value
    elif isinstance(value, str):
        try:
            size = parse_size(value, name)
        except ConfigError as exc:
            raise BadRequest(f"{name}: {exc}") from None
    else:
        raise BadRequest(f"{name} must be a byte count or a size like \"1GiB\" (0: none)")
    if not 0 <= size <= MAX_QUOTA_BYTES:
        raise BadRequest(f"{name} must be a size in 0..{MAX_QUOTA_BYTES} bytes (0: none)")
    return size
