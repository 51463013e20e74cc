"""Signed namespace tokens and signed handoffs: HMAC-SHA256 under an operator's key.

Who may name a tenant namespace, and who may announce a handoff, is decided by whoever holds the
signing key (the operator, a trusted gateway, ``kvtier proxy``, a prefill engine), never by a
client. With a key configured (``signing.key_file`` or ``signing.key_env``), an engine takes a
request's namespace only from a valid namespace token and its ``expect_tokens`` only from a valid
handoff.

Namespace token (issued to a tenant, or inserted by a gateway/proxy that authenticated it)::

    kvns1:<namespace>:<expires_at_s>:<mac>

Handoff (a prefill engine answers with one; a decode engine honours it only for the same
namespace and prompt)::

    kvho1:<namespace>:<expect_tokens>:<prompt_id>:<expires_at_s>:<mac>

- ``expires_at_s``: Unix time in whole seconds; a token is valid while ``now < expires_at_s``;
- ``prompt_id``: 32 to 128 lowercase hex digits naming the prompt. kvtier's engines use
  ``prompt_id_of(key)``, the chunk key of the last announced chunk, which covers the namespace,
  the salt and every token before it: only a request with the same prompt (in the same tenant
  and salt) can use the handoff;
- ``mac``: unpadded base64url of HMAC-SHA256(key, everything before the last ``:``). The prefix
  (``kvns1``/``kvho1``) is signed, so one kind of token never passes for the other.

Verification is strict (ASCII, at most ``MAX_TOKEN_CHARS``, exact field syntax) and compares MACs
in constant time (``hmac.compare_digest``). Failures raise ``MalformedTokenError``,
``BadSignatureError`` or ``ExpiredTokenError`` (all ``TokenError``); messages never quote the
token or the key.

Typical uses::

    key = load_signing_key(key_file="/etc/kvtier/signing.key", key_env=None, environ=os.environ)
    token = sign_namespace(key, NamespaceClaim("tenant-a", expires_at_s=int(time.time()) + 3600))
    claim = verify_namespace(key, token, now_s=time.time())          # NamespaceClaim
    handoff = sign_handoff(key, HandoffClaim("tenant-a", 4096, prompt_id_of(last_key), expires))
    verify_handoff(key, handoff, now_s=time.time()).expect_tokens    # 4096

This module imports only the standard library and ``kvtier.errors`` (bottom layer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kvtier.configparts.sources import load_secret
from kvtier.errors import BadSignatureError, ExpiredTokenError, MalformedTokenError

MIN_KEY_BYTES = 32
MAX_TOKEN_CHARS = 512
NAMESPACE_PREFIX = "kvns1"
HANDOFF_PREFIX = "kvho1"
_NAMESPACE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}"  # config.NAMESPACE_PATTERN (same layer: no import)
_MAC = r"[A-Za-z0-9_-]{43}"  # 32 bytes, base64url without padding
_NAMESPACE_TOKEN = re.compile(rf"{NAMESPACE_PREFIX}:({_NAMESPACE}):([1-9][0-9]{{0,10}}):({_MAC})")
_HANDOFF_TOKEN = re.compile(rf"{HANDOFF_PREFIX}:({_NAMESPACE}):(0|[1-9][0-9]{{0,9}}):([0-9a-f]{{32,128}}):"
                            rf"([1-9][0-9]{{0,10}}):({_MAC})")
_HEX_KEY = re.compile(r"(?:[0-9a-fA-F]{2}){32,}")


@dataclass(frozen=True, repr=False)
class SigningKey:
    """An HMAC-SHA256 key of at least ``MIN_KEY_BYTES`` bytes. Its repr never shows the bytes."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise ValueError(f"a signing key needs at least {MIN_KEY_BYTES} bytes, got {len(self.secret)}")

    def __repr__(self) -> str:
        return "SigningKey(***)"

    def mac(self, message: str) -> str:
        digest = hmac.new(self.secret, message.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class NamespaceClaim:
    """What a namespace token proves: its holder may use ``namespace`` until ``expires_at_s``."""

    namespace: str
    expires_at_s: int


@dataclass(frozen=True)
class HandoffClaim:
    """What a handoff proves: a prefill step stored the first ``expect_tokens`` tokens of the
    prompt named ``prompt_id`` in ``namespace``; honour it until ``expires_at_s``."""

    namespace: str
    expect_tokens: int
    prompt_id: str
    expires_at_s: int


def prompt_id_of(chunk_key: bytes) -> str:
    """The ``prompt_id`` kvtier's engines bind a handoff to: the hex of the last announced
    chunk's key (the key chain covers namespace, salt and every token up to that chunk)."""
    return chunk_key.hex()


def sign_namespace(key: SigningKey, claim: NamespaceClaim) -> str:
    """The namespace token of ``claim``. ``ValueError`` if a field could not be parsed back."""
    body = f"{NAMESPACE_PREFIX}:{claim.namespace}:{claim.expires_at_s}"
    token = f"{body}:{key.mac(body)}"
    if _NAMESPACE_TOKEN.fullmatch(token) is None:
        raise ValueError("cannot sign: the namespace or expiry is out of the token's syntax")
    return token


def verify_namespace(key: SigningKey, token: object, now_s: float) -> NamespaceClaim:
    """The claim ``token`` carries, if signed with ``key`` and not expired at ``now_s``.
    Raises ``MalformedTokenError``, ``BadSignatureError`` or ``ExpiredTokenError``."""
    match = _NAMESPACE_TOKEN.fullmatch(_text(token, "namespace token"))
    if match is None:
        raise MalformedTokenError(f"not a namespace token ({NAMESPACE_PREFIX}:<namespace>:<expires_at_s>:<mac>)")
    _check_mac(key, match.group(0), match.group(3))
    claim = NamespaceClaim(match.group(1), int(match.group(2)))
    _check_expiry(claim.expires_at_s, now_s, "namespace token")
    return claim


def sign_handoff(key: SigningKey, claim: HandoffClaim) -> str:
    """The handoff token of ``claim``. ``ValueError`` if a field could not be parsed back."""
    body = (f"{HANDOFF_PREFIX}:{claim.namespace}:{claim.expect_tokens}:{claim.prompt_id}:"
            f"{claim.expires_at_s}")
    token = f"{body}:{key.mac(body)}"
    if _HANDOFF_TOKEN.fullmatch(token) is None:
        raise ValueError("cannot sign: a handoff field is out of the token's syntax")
    return token


def verify_handoff(key: SigningKey, token: object, now_s: float) -> HandoffClaim:
    """The claim ``token`` carries, if signed with ``key`` and not expired at ``now_s``. The
    caller still checks that the namespace and ``prompt_id`` are the request's own.
    Raises ``MalformedTokenError``, ``BadSignatureError`` or ``ExpiredTokenError``."""
    match = _HANDOFF_TOKEN.fullmatch(_text(token, "handoff"))
    if match is None:
        raise MalformedTokenError(f"not a handoff ({HANDOFF_PREFIX}:<namespace>:<expect_tokens>:"
                                  "<prompt_id>:<expires_at_s>:<mac>)")
    _check_mac(key, match.group(0), match.group(5))
    claim = HandoffClaim(match.group(1), int(match.group(2)), match.group(3), int(match.group(4)))
    _check_expiry(claim.expires_at_s, now_s, "handoff")
    return claim


def parse_signing_key(text: bytes) -> SigningKey:
    """The key ``text`` spells: at least 64 hex digits, or base64 of at least 32 bytes (whitespace
    around it ignored). ``ValueError`` otherwise, with a reason that never quotes ``text``."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("is empty; make a key with: openssl rand -hex 32")
    ascii_text = stripped.decode("ascii", errors="replace")
    if _HEX_KEY.fullmatch(ascii_text):
        return SigningKey(bytes.fromhex(ascii_text))
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is neither hex nor base64 ({len(stripped)} characters); make a key with: "
                         "openssl rand -hex 32") from None
    if len(decoded) < MIN_KEY_BYTES:
        raise ValueError(f"holds {len(decoded)} bytes, a signing key needs at least {MIN_KEY_BYTES}; "
                         "make one with: openssl rand -hex 32")
    return SigningKey(decoded)


def load_signing_key(key_file: str | None, key_env: str | None, environ: Mapping[str, str]) -> SigningKey | None:
    """The key from the file ``key_file`` or the environment variable named ``key_env`` (config
    ``signing.key_file`` / ``signing.key_env``); None when neither is set (signing off).
    Raises ``ConfigError`` naming the config key when the source is missing, unreadable or does
    not hold a key. Messages never include key material."""
    return load_secret("signing", key_file, key_env, environ, parse_signing_key)


def load_peer_secret(key_file: str | None, key_env: str | None, environ: Mapping[str, str]) -> bytes | None:
    """The shared secret peers prove to each other (``p2p.key_file`` / ``p2p.key_env``; spelled like
    a signing key: at least 32 bytes as hex or base64); None when neither is set. ``ConfigError``
    naming the config key as ``load_signing_key``; messages never include key material."""
    key = load_secret("p2p", key_file, key_env, environ, parse_signing_key)
    return None if key is None else key.secret



def _text(token: object, kind: str) -> str:
    if not isinstance(token, str):
        raise MalformedTokenError(f"a {kind} must be a string, got {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise MalformedTokenError(f"a {kind} is ASCII of at most {MAX_TOKEN_CHARS} characters")
    return token


def _check_mac(key: SigningKey, token: str, mac: str) -> None:
    body = token[: -len(mac) - 1]
    if not hmac.compare_digest(key.mac(body), mac):
        raise BadSignatureError("signature does not match (altered, or signed with another key)")


def _check_expiry(expires_at_s: int, now_s: float, kind: str) -> None:
    if now_s >= expires_at_s:
        raise ExpiredTokenError(f"{kind} expired {int(now_s - expires_at_s)} s ago")
