"""What the proxy sends each instance: pure functions over parsed JSON request bodies."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

# kvtier's handoff fields: only a prefill instance (through the proxy) sets them, never a client.
# ``handoff`` is the signed form (``kvtier.signing``), which a prefill engine with a signing key
# issues bound to the namespace and prompt; the proxy passes it on and never signs itself.
HANDOFF_FIELDS = ("expect_tokens", "handoff")


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

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def strip_handoff(body: Mapping[str, object]) -> dict[str, object]:
    """The client's request without kvtier handoff fields in ``kv_transfer_params.kvtier``: a
    client must not announce chunks (``expect_tokens``, ``handoff``) that no prefill instance
    computed for it.
    The client's other kvtier controls (namespace, store, load) and other sections are kept."""
    out = dict(body)
    params = body.get("kv_transfer_params")
    if not isinstance(params, Mapping):
        return out
    section = params.get("kvtier")
    if isinstance(section, Mapping) and any(name in section for name in HANDOFF_FIELDS):
        kept = {key: value for key, value in section.items() if key not in HANDOFF_FIELDS}
        out["kv_transfer_params"] = {**params, "kvtier": kept}
    return out


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


def openai_error(status: int, message: str) -> dict[str, object]:
    """An error body in the OpenAI API's format (what vLLM answers too)."""
    kind = "invalid_request_error" if status < 500 else "service_unavailable" if status == 503 else "upstream_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
