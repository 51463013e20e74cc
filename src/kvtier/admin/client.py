"""A client of the admin API, for ``kvtier admin`` (plain urllib: what curl would send)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from kvtier.errors import ServerError


class AdminRefused(Exception):
    """The API answered 4xx: ``status`` and its ``error`` text."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"HTTP {status}: {error}")
        self.status = status


def admin_request(base_url: str, token: str, method: str, path: str, body: object = None,
                  timeout_s: float = 60.0) -> dict[str, object]:
    """The JSON answer of one request. Raises ``AdminRefused`` for a 4xx answer and
    ``ServerError`` when the API cannot be reached or fails (5xx, not JSON)."""
    url = base_url.rstrip("/") + path
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return _json(url, response.read())
    except urllib.error.HTTPError as exc:
        answer = _json(url, exc.read())
        if 400 <= exc.code < 500:
            raise AdminRefused(exc.code, str(answer.get("error", ""))) from None
        raise ServerError(f"{url} answered HTTP {exc.code}: {answer.get('error', '')}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def _json(url: str, data: bytes) -> dict[str, object]:
    try:
        value = json.loads(data)
    except ValueError:
        raise ServerError(f"{url} did not answer JSON: is this kvtier's admin port?") from None
    if not isinstance(value, dict):
        raise ServerError(f"{url} did not answer a JSON object: is this kvtier's admin port?")
    return value
