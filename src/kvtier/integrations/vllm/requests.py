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

Signed tenancy (``Trust``, with ``signing.key_file``/``signing.key_env`` configured): the
namespace comes only from ``{"kvtier": {"namespace_token": "kvns1:..."}}`` (``kvtier.signing``)
and ``expect_tokens`` only from a signed ``{"kvtier": {"handoff": "kvho1:..."}}`` of the same
namespace (the scheduler then checks it names the request's own prompt). A plain ``namespace``
other than the default, or a token that is altered, expired or signed with another key: served
without kvtier (never mapped to the default, where others could probe it). No namespace and no
token: the default namespace if ``signing.unsigned`` is ``default``, else served without kvtier.
A plain ``expect_tokens`` is ignored. Without a key, the fields are trusted as sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from kvtier.config import NAMESPACE_PATTERN, is_namespace
from kvtier.errors import TokenError
from kvtier.fingerprint import adapter_fingerprint
from kvtier.signing import SigningKey, verify_handoff, verify_namespace

logger = logging.getLogger("kvtier")

_KNOWN = {"namespace", "store", "load", "expect_tokens", "namespace_token", "handoff"}
MAX_EXPECT_TOKENS = 1 << 31


@dataclass(frozen=True)
class RequestControls:
    namespace: str
    load: bool
    store: bool
    salt: str = ""
    expect_tokens: int = 0  # a handoff: prompt tokens a prefill instance stored for this request
    handoff_prompt_id: str = ""  # a signed handoff's prompt (``signing.prompt_id_of``); "" unsigned


@dataclass(frozen=True)
class Trust:
    """Signed tenancy: the key namespace tokens and handoffs must be signed with, and whether a
    request without a namespace token is refused (served without kvtier) or in the default."""

    key: SigningKey
    refuse_unsigned: bool


def request_controls(params: Mapping[str, object] | None, cache_salt: str | None,
                     default_namespace: str, no_cache: frozenset[str] = frozenset(),
                     binding: str | None = "", trust: Trust | None = None,
                     now_s: float | None = None) -> RequestControls:
    """The request's controls; a namespace in ``no_cache`` never loads or stores. ``binding``
    (``content_binding``) joins the salt; None: the request cannot be keyed, kvtier stays out.
    ``trust``: namespace and handoff only from tokens valid at ``now_s`` (Unix seconds; None: now)."""
    controls = _controls(params, cache_salt, default_namespace)
    if trust is not None and (controls.store or controls.load):
        controls = _signed(controls, (params or {}).get("kvtier"), default_namespace, trust,
                           time.time() if now_s is None else now_s)
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
        parts.append(_lora_binding(lora))
    for feature in mm_features or ():
        position = getattr(feature, "mm_position", None)
        parts.append(f"mm:{getattr(feature, 'identifier', '')}@{getattr(position, 'offset', '')}"
                     f"+{getattr(position, 'length', '')}")
    return "\n".join(parts)


def _lora_binding(lora: object) -> str:
    """An adapter in a local folder is keyed by its files alone, so instances that load the same
    adapter under other names, ids or mount paths share its KV; any other is keyed by name, id
    and path (never shared, never confused)."""
    path = str(getattr(lora, "lora_path", "") or "")
    lora_id = int(getattr(lora, "lora_int_id", 0) or 0)
    fingerprint = adapter_fingerprint(path, lora_id) if path else ""
    if fingerprint:
        return f"lora-files:{fingerprint}"
    return f"lora:{getattr(lora, 'lora_name', '')}:{lora_id}:{path}"


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


def _signed(controls: RequestControls, section: object, default_namespace: str, trust: Trust,
            now_s: float) -> RequestControls:
    """``controls`` with the namespace and handoff the request proves (served without kvtier when
    it proves none and unsigned requests are refused)."""
    fields: Mapping[str, object] = section if isinstance(section, Mapping) else {}
    namespace, problem = _signed_namespace(fields, default_namespace, trust, now_s)
    if namespace is None:
        if problem:
            logger.warning("kvtier: request served without kvtier: %s", problem)
        return RequestControls(default_namespace, False, False, controls.salt)
    expect, prompt_id = 0, ""
    if "handoff" in fields:
        try:
            claim = verify_handoff(trust.key, fields["handoff"], now_s)
        except TokenError as exc:
            logger.warning("kvtier: handoff ignored: %s", exc)
        else:
            if claim.namespace == namespace and claim.expect_tokens < MAX_EXPECT_TOKENS:
                expect, prompt_id = claim.expect_tokens, claim.prompt_id
    return replace(controls, namespace=namespace, expect_tokens=expect, handoff_prompt_id=prompt_id)


def _signed_namespace(fields: Mapping[str, object], default_namespace: str, trust: Trust,
                      now_s: float) -> tuple[str | None, str]:
    """The namespace a request proves, or None and the reason ("" for a plain refusal)."""
    named = fields.get("namespace")
    if "namespace_token" not in fields:
        if named is not None and named != default_namespace:
            return None, f"kv_transfer_params.kvtier.namespace {named!r} is not signed (send a namespace_token)"
        return (None, "") if trust.refuse_unsigned else (default_namespace, "")
    try:
        claim = verify_namespace(trust.key, fields["namespace_token"], now_s)
    except TokenError as exc:
        return None, f"namespace_token: {exc}"
    if named is not None and named != claim.namespace:
        return None, "kv_transfer_params.kvtier.namespace differs from its namespace_token's"
    return claim.namespace, ""


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
