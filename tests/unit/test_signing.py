"""Signed namespace tokens and handoffs (kvtier.signing): round trips, and every way a token
can be wrong is a typed error that never quotes the token or the key."""

from __future__ import annotations

import base64

import pytest

from kvtier.errors import BadSignatureError, ConfigError, ExpiredTokenError, MalformedTokenError, TokenError
from kvtier.signing import (HandoffClaim, NamespaceClaim, SigningKey, load_signing_key, parse_signing_key,
                            prompt_id_of, sign_handoff, sign_namespace, verify_handoff, verify_namespace)

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
NOW = 1_800_000_000.0
PROMPT = prompt_id_of(bytes(range(16)))


def test_namespace_token_round_trip() -> None:
    token = sign_namespace(KEY, NamespaceClaim("tenant-a.v2", int(NOW) + 60))
    assert token.startswith("kvns1:tenant-a.v2:")
    assert verify_namespace(KEY, token, NOW) == NamespaceClaim("tenant-a.v2", int(NOW) + 60)


def test_namespace_token_other_key_or_altered_is_bad_signature() -> None:
    token = sign_namespace(KEY, NamespaceClaim("tenant-a", int(NOW) + 60))
    with pytest.raises(BadSignatureError):
        verify_namespace(OTHER, token, NOW)
    with pytest.raises(BadSignatureError):  # the tenant renamed, the MAC kept
        verify_namespace(KEY, token.replace("tenant-a", "tenant-b"), NOW)
    with pytest.raises(BadSignatureError):  # the expiry pushed out
        verify_namespace(KEY, token.replace(f":{int(NOW) + 60}:", f":{int(NOW) + 6000}:"), NOW)


def test_namespace_token_expired() -> None:
    token = sign_namespace(KEY, NamespaceClaim("tenant-a", int(NOW)))
    with pytest.raises(ExpiredTokenError):
        verify_namespace(KEY, token, NOW)
    assert verify_namespace(KEY, token, NOW - 1).namespace == "tenant-a"


@pytest.mark.parametrize("token", [None, 7, "", "tenant-a", "kvns1:tenant-a:1:abc", "kvns1:../x:99999999999:" + "A" * 43,
                                   "kvns1:tenant-a:0123:" + "A" * 43, "kvns1:tenant-a:99:" + "A" * 43 + "\n",
                                   "kvns1:tenant-ä:99:" + "A" * 43, "x" * 10_000])
def test_malformed_namespace_tokens(token: object) -> None:
    with pytest.raises(MalformedTokenError) as info:
        verify_namespace(KEY, token, NOW)
    assert "tenant" not in str(info.value)  # never quotes the token


def test_kinds_do_not_cross() -> None:
    handoff = sign_handoff(KEY, HandoffClaim("tenant-a", 512, PROMPT, int(NOW) + 60))
    with pytest.raises(MalformedTokenError):
        verify_namespace(KEY, handoff, NOW)
    namespace = sign_namespace(KEY, NamespaceClaim("tenant-a", int(NOW) + 60))
    with pytest.raises(MalformedTokenError):
        verify_handoff(KEY, namespace, NOW)
    # the prefix is signed: relabelling a token as the other kind does not carry the MAC over
    relabelled = namespace.replace("kvns1:", "kvho1:", 1)
    with pytest.raises(TokenError):
        verify_handoff(KEY, relabelled, NOW)


def test_handoff_round_trip_and_binding_fields() -> None:
    claim = HandoffClaim("tenant-a", 4096, PROMPT, int(NOW) + 30)
    token = sign_handoff(KEY, claim)
    assert verify_handoff(KEY, token, NOW) == claim
    with pytest.raises(BadSignatureError):  # more tokens announced than signed
        verify_handoff(KEY, token.replace(":4096:", ":8192:"), NOW)
    with pytest.raises(BadSignatureError):  # another prompt
        verify_handoff(KEY, token.replace(PROMPT, prompt_id_of(bytes(16))), NOW)
    with pytest.raises(ExpiredTokenError):
        verify_handoff(KEY, token, NOW + 30)


def test_signing_refuses_what_cannot_be_parsed_back() -> None:
    with pytest.raises(ValueError):
        sign_namespace(KEY, NamespaceClaim("a:b", int(NOW)))
    with pytest.raises(ValueError):
        sign_handoff(KEY, HandoffClaim("tenant-a", -1, PROMPT, int(NOW)))
    with pytest.raises(ValueError):
        sign_handoff(KEY, HandoffClaim("tenant-a", 1, "XYZ", int(NOW)))


def test_key_parsing_and_repr() -> None:
    assert parse_signing_key(b"  " + b"ab" * 32 + b"\n").secret == bytes([0xAB]) * 32
    assert parse_signing_key(base64.b64encode(bytes(range(48)))).secret == bytes(range(48))
    for bad in (b"", b"ab" * 31, base64.b64encode(bytes(16)), b"not a key!"):
        with pytest.raises(ValueError):
            parse_signing_key(bad)
    with pytest.raises(ValueError):
        SigningKey(bytes(31))
    assert "0" not in repr(SigningKey(bytes(32)))


def test_load_signing_key_sources(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "signing.key"  # type: ignore[operator]
    path.write_text("cd" * 32)
    assert load_signing_key(str(path), None, {}) == SigningKey(bytes([0xCD]) * 32)
    assert load_signing_key(None, "SIGN", {"SIGN": "cd" * 32}) == SigningKey(bytes([0xCD]) * 32)
    assert load_signing_key(None, None, {}) is None
    with pytest.raises(ConfigError, match="signing.key_file"):
        load_signing_key(str(path) + ".missing", None, {})
    with pytest.raises(ConfigError, match="signing.key_env"):
        load_signing_key(None, "SIGN", {})
    with pytest.raises(ConfigError, match="signing.key_env") as info:
        load_signing_key(None, "SIGN", {"SIGN": "secret-but-short"})
    assert "secret-but-short" not in str(info.value)
