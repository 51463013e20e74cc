"""Per-request controls, read from what a client can send with a request.

- ``kv_transfer_params={"kvtier": {"namespace": "tenant-a", "store": false, "load": false}}``
  (vLLM passes ``kv_transfer_params`` through from the OpenAI API's request body);
- ``{"kvtier": {"expect_tokens": N}}``: a disaggregated-prefill handoff. A prefill instance
  (``kv_role: kv_producer``) answers with it; sent on to a decode instance, it makes that one wait
  (up to ``remote.handoff_wait_ms``) until the shared remote tier holds the prompt's first N
  tokens, instead of recomputing what is still being uploaded;
- vLLM's ``cache_salt``: becomes part of every key of the request, so requests with different
  salts never share KV, on any tier;
- the configuration's ``no_cache_namespaces``: requests in these namespaces never load or store;
- what changes the KV besides the tokens (``content_binding``): the request's LoRA adapter (its
  name, id, path and a fingerprint of its files) and its multimodal inputs (vLLM's per-item hashes
  and their positions) are bound into every key with the salt, so the same tokens under another
  adapter or image never hit; prompt embeddings cannot be keyed: such a request is served
  without kvtier.
A request that sends malformed controls is served without kvtier (no load, no store) and a
warning names the problem: a typo must never widen who can read a prompt's KV.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from kvtier.config import NAMESPACE_PATTERN, is_namespace
from kvtier.fingerprint import adapter_fingerprint

logger = logging.getLogger("kvtier")

_KNOWN = {"namespace", "store", "load", "expect_tokens"}
MAX_EXPECT_TOKENS = 1 << 31


@dataclass(frozen=True)
class RequestControls:
    namespace: str
    load: bool
    store: bool
    salt: str = ""
    expect_tokens: int = 0  # a handoff: prompt tokens a prefill instance stored for this request


def request_controls(params: Mapping[str, object] | None, cache_salt: str | None,
                     default_namespace: str, no_cache: frozenset[str] = frozenset(),
                     binding: str | None = "") -> RequestControls:
    """The request's controls; a namespace in ``no_cache`` never loads or stores. ``binding``
    (``content_binding``) joins the salt; None: the request cannot be keyed, kvtier stays out."""
    controls = _controls(params, cache_salt, default_namespace)
    if binding:
        controls = replace(controls, salt=f"{controls.salt}\x1f{binding}")
    if controls.namespace in no_cache or binding is None:
        return RequestControls(controls.namespace, False, False, controls.salt)
    return controls


def content_binding(lora: object | None, mm_features: Sequence[object] | None, prompt_embeds: object | None) -> str | None:
    """What besides the token ids changes a request's KV, as text to bind into its keys ("" for a
    plain request); None when kvtier cannot key it (prompt embeddings)."""
    if prompt_embeds is not None:
        return None
    parts: list[str] = []
    if lora is not None:
        path = str(getattr(lora, "lora_path", "") or "")
        parts.append(f"lora:{getattr(lora, 'lora_int_id', '')}:{getattr(lora, 'lora_name', '')}:{path}:"
                     f"{adapter_fingerprint(path) if path else ''}")
    for feature in mm_features or ():
        position = getattr(feature, "mm_position", None)
        parts.append(f"mm:{getattr(feature, 'identifier', '')}@{getattr(position, 'offset', '')}"
                     f"+{getattr(position, 'length', '')}")
    return "\n".join(parts)


def _controls(params: Mapping[str, object] | None, cache_salt: str | None,
              default_namespace: str) -> RequestControls:
    salt = cache_salt or ""
    section = (params or {}).get("kvtier")
    if section is None:
        return RequestControls(default_namespace, True, True, salt)
    problem = _problem(section)
    if problem:
        logger.warning("kvtier: request controls ignored, request served without kvtier: %s", problem)
        return RequestControls(default_namespace, False, False, salt)
    assert isinstance(section, Mapping)
    namespace = section.get("namespace", default_namespace)
    return RequestControls(str(namespace), bool(section.get("load", True)), bool(section.get("store", True)), salt,
                           int(section.get("expect_tokens", 0)))


def _problem(section: object) -> str | None:
    if not isinstance(section, Mapping):
        return f"kv_transfer_params.kvtier must be an object, got {type(section).__name__}"
    unknown = set(section) - _KNOWN
    if unknown:
        return f"unknown kv_transfer_params.kvtier keys {sorted(unknown)} (known: {sorted(_KNOWN)})"
    namespace = section.get("namespace")
    if namespace is not None and not is_namespace(namespace):
        return f"kv_transfer_params.kvtier.namespace {namespace!r} must match {NAMESPACE_PATTERN}"
    for flag in ("load", "store"):
        if flag in section and not isinstance(section[flag], bool):
            return f"kv_transfer_params.kvtier.{flag} must be true or false"
    expect = section.get("expect_tokens", 0)
    if isinstance(expect, bool) or not isinstance(expect, int) or not 0 <= expect < MAX_EXPECT_TOKENS:
        return f"kv_transfer_params.kvtier.expect_tokens must be an integer >= 0, got {expect!r}"
    return None
