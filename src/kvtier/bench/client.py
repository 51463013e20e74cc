"""HTTP client for an OpenAI-compatible server: one streamed chat or completion request, timed.

Time to first token (TTFT) is measured from just before the request is sent to the arrival of the
first streamed chunk that carries content (or, for an empty answer, the finishing chunk). The
arrival time of every content chunk is kept, so inter-token latency can be computed from the stream.
Only the standard library is used, so ``kvtier stats`` needs no extra package.
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
class RequestOptions:
    """Per-request extras vLLM understands. ``ignore_eos`` makes every answer exactly ``max_tokens``
    long (so configurations decode the same volume); ``cache_salt`` isolates prefix caches (vLLM's
    and kvtier's) from requests with another salt."""

    ignore_eos: bool = False
    cache_salt: str | None = None


@dataclass(frozen=True)
class ChatResult:
    ttft_s: float
    total_s: float
    answer: str
    num_prompt_tokens: int
    num_cached_tokens: int | None  # None unless the server runs with --enable-prompt-tokens-details
    num_completion_tokens: int
    chunk_times_s: tuple[float, ...] = ()  # arrival of each content chunk, seconds after sending


def stream_chat(base_url: str, model: str, messages: list[Message], max_tokens: int,
                timeout_s: float, options: RequestOptions = RequestOptions()) -> ChatResult:
    """Send one greedy (temperature 0) streamed chat completion and time it.

    Raises ServerError on a connection failure or a non-200 answer."""
    body = {"model": model, "messages": messages, **_common_fields(max_tokens, options)}
    return _stream(base_url, "/v1/chat/completions", body, timeout_s)


def stream_completion(base_url: str, model: str, token_ids: list[int], max_tokens: int,
                      timeout_s: float, options: RequestOptions = RequestOptions()) -> ChatResult:
    """Send one greedy streamed completion whose prompt is given as token ids (no chat template,
    no tokenizer: the engine sees exactly these tokens). Raises ServerError like ``stream_chat``."""
    body = {"model": model, "prompt": token_ids, **_common_fields(max_tokens, options)}
    return _stream(base_url, "/v1/completions", body, timeout_s)


def _common_fields(max_tokens: int, options: RequestOptions) -> dict[str, object]:
    fields: dict[str, object] = {"max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                                 "stream_options": {"include_usage": True}}
    if options.ignore_eos:
        fields["ignore_eos"] = True
    if options.cache_salt is not None:
        fields["cache_salt"] = options.cache_salt
    return fields


def _stream(base_url: str, path: str, body: dict[str, object], timeout_s: float) -> ChatResult:
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout_s)
    try:
        started_s = time.perf_counter()
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            text = response.read(500).decode(errors="replace")
            raise ServerError(f"{base_url}{path} answered HTTP {response.status}: {text}")
        return _read_stream(response, started_s)
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(f"request to {base_url}{path} failed: {exc}") from exc
    finally:
        connection.close()


def _read_stream(response: http.client.HTTPResponse, started_s: float) -> ChatResult:
    first_token_s: float | None = None
    parts: list[str] = []
    chunk_times_s: list[float] = []
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
            content = (choice.get("delta") or {}).get("content") or choice.get("text")
            now_s = time.perf_counter()
            if content:
                parts.append(content)
                chunk_times_s.append(now_s - started_s)
            if first_token_s is None and (content or choice.get("finish_reason")):
                first_token_s = now_s
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
                      num_completion_tokens=_int(usage.get("completion_tokens")),
                      chunk_times_s=tuple(chunk_times_s))


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


def served_model(base_url: str, timeout_s: float) -> str:
    """The first model id ``GET /v1/models`` lists. Raises ServerError if there is none."""
    try:
        listing = json.loads(fetch_text(f"{base_url.rstrip('/')}/v1/models", timeout_s))
        return str(listing["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ServerError(f"{base_url}/v1/models lists no model: {exc}") from exc
