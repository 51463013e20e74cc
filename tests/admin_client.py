"""A minimal client of kvtier's admin API for the tests (plain urllib, as an operator's curl)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def admin_call(base_url: str, method: str, path: str, body: object = None, token: str | None = None,
               raw: bytes | None = None) -> tuple[int, dict]:
    """``(HTTP status, JSON answer)`` of one request; ``raw`` sends those bytes as the body."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(base_url + path, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
