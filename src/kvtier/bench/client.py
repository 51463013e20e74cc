"""HTTP client for an OpenAI-compatible server: one streamed chat request, timed.

Time to first token (TTFT) is measured from just before the request is sent to the arrival of the
first streamed chunk that carries content (or, for an empty answer, the finishing chunk). Only the
standard library is used, so ``kvtier stats`` needs no extra package.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from kvtier.errors import ServerError

Message = dict[str, str]


@dataclass(frozen=True)
class ChatResult:
    ttft_s: float
    total_s: float
    answer: str
    num_prompt_tokens: int
    num_cached_tokens: int | None  # None unless the server runs with --enable-prompt-tokens-details
    num_completion_tokens: int


def stream_chat(base_url: str, model: str, messages: list[Message], max_tokens: int,
                timeout_s: float) -> ChatResult:
    """Send one greedy (temperature 0) streamed chat completion and time it.

    Raises ServerError on a connection failure or a non-200 answer."""
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout_s)
    try:
        started_s = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            text = response.read(500).decode(errors="replace")
            raise ServerError(f"{base_url}/v1/chat/completions answered HTTP {response.status}: {text}")
        return _read_stream(response, started_s)
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(f"chat request to {base_url} failed: {exc}") from exc
    finally:
        connection.close()


def _read_stream(response: http.client.HTTPResponse, started_s: float) -> ChatResult:
    first_token_s: float | None = None
    parts: list[str] = []
    usage: dict[str, object] = {}
    for raw_line in response:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[len(b"data:"):].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
            if first_token_s is None and (content or choice.get("finish_reason")):
                first_token_s = time.perf_counter()
        if chunk.get("usage"):
            usage = chunk["usage"]
    finished_s = time.perf_counter()
    if first_token_s is None:
        raise ServerError("the streamed answer carried no token")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return ChatResult(ttft_s=first_token_s - started_s, total_s=finished_s - started_s, answer="".join(parts),
                      num_prompt_tokens=_int(usage.get("prompt_tokens")),
                      num_cached_tokens=None if cached is None else _int(cached),
                      num_completion_tokens=_int(usage.get("completion_tokens")))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def fetch_text(url: str, timeout_s: float) -> str:
    """GET a text resource (e.g. Prometheus ``/metrics``). Raises ServerError if it cannot."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        raise ServerError(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach {url}: {reason}") from exc
