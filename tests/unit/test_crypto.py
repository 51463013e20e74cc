"""kvtier.crypto: sealing round trip, every kind of tampering fails, key derivation, master keys."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.config import EncryptionConfig
from kvtier.crypto import MASTER_KEY_BYTES, SEAL_OVERHEAD_BYTES, Sealer, load_sealer, parse_master_key
from kvtier.entry import CODEC_AES256_GCM, sealed_aad
from kvtier.errors import ConfigError

MASTER = bytes(range(32))
SEALER = Sealer(MASTER)
KEY_A, KEY_B = bytes(range(16)), bytes(range(1, 17))
LAYOUT, OTHER_LAYOUT = bytes(16), bytes([7]) * 16
AAD = sealed_aad(KEY_A, 0, LAYOUT, CODEC_AES256_GCM)
CONTEXT = b"tenant-a"
PAYLOAD = os.urandom(3000)


def opened(sealed: bytes | bytearray, context: bytes = CONTEXT, aad: bytes = AAD, sealer: Sealer = SEALER,
           num_bytes: int = len(PAYLOAD)) -> bytes | None:
    """The plaintext ``sealed`` opens to, or None when it does not open."""
    out = bytearray(num_bytes)
    return bytes(out) if sealer.open_into(context, aad, sealed, memoryview(out)) else None


@settings(max_examples=200)
@given(payload=st.binary(max_size=2048), context=st.binary(max_size=80), aad=st.binary(max_size=100))
def test_round_trip(payload: bytes, context: bytes, aad: bytes) -> None:
    sealed = SEALER.seal(context, aad, payload)
    assert len(sealed) == len(payload) + SEAL_OVERHEAD_BYTES == Sealer.sealed_bytes(len(payload))
    assert opened(sealed, context, aad, num_bytes=len(payload)) == payload


def test_seal_reads_any_contiguous_buffer_and_is_fresh_each_time() -> None:
    pool = bytearray(b"x" * 100 + PAYLOAD + b"y" * 100)
    sealed = [SEALER.seal(CONTEXT, AAD, source) for source in
              (PAYLOAD, bytearray(PAYLOAD), memoryview(pool)[100:100 + len(PAYLOAD)])]
    assert all(opened(each) == PAYLOAD for each in sealed)
    assert len({bytes(each) for each in sealed}) == 3  # a fresh salt and nonce every time
    assert PAYLOAD[:64] not in sealed[0]


def test_the_documented_format_and_key_derivation() -> None:
    # salt (16) || nonce (12) || ciphertext || tag (16); key = HKDF-SHA256(master, salt, info).
    sealed = bytes(SEALER.seal(CONTEXT, AAD, PAYLOAD))
    salt, nonce, body = sealed[:16], sealed[16:28], sealed[28:]
    key = HKDF(hashes.SHA256(), 32, salt, b"kvtier-entry-v1|" + CONTEXT).derive(MASTER)
    assert AESGCM(key).decrypt(nonce, body, AAD) == PAYLOAD


def test_two_namespaces_get_different_keys() -> None:
    salt = os.urandom(16)
    keys = {HKDF(hashes.SHA256(), 32, salt, b"kvtier-entry-v1|" + label).derive(MASTER)
            for label in (b"tenant-a", b"tenant-b", b"")}
    assert len(keys) == 3
    sealed = SEALER.seal(b"tenant-a", AAD, PAYLOAD)
    assert opened(sealed, b"tenant-a") == PAYLOAD
    assert opened(sealed, b"tenant-b") is None
    assert opened(sealed, b"") is None
    assert opened(SEALER.seal(b"", AAD, PAYLOAD), b"tenant-a") is None


def test_every_single_byte_flip_fails_and_leaves_no_plaintext() -> None:
    sealed = SEALER.seal(CONTEXT, AAD, PAYLOAD[:200])
    for offset in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[offset] ^= 0x01 if offset % 2 else 0x80
        out = bytearray(b"\xaa" * 200)
        assert not SEALER.open_into(CONTEXT, AAD, damaged, memoryview(out)), offset
        assert out == bytes(200)  # zeroed: no unauthenticated plaintext left behind


@pytest.mark.parametrize("change", ["truncated", "extended", "empty", "overhead only"])
def test_wrong_length_fails(change: str) -> None:
    sealed = bytes(SEALER.seal(CONTEXT, AAD, PAYLOAD))
    damaged = {"truncated": sealed[:-1], "extended": sealed + b"\0", "empty": b"",
               "overhead only": sealed[:SEAL_OVERHEAD_BYTES]}[change]
    assert opened(damaged) is None
    assert opened(sealed, num_bytes=len(PAYLOAD) - 1) is None  # the reader expects another size


def test_swapped_entries_between_two_keys_fail() -> None:
    aad_a, aad_b = sealed_aad(KEY_A, 0, LAYOUT, CODEC_AES256_GCM), sealed_aad(KEY_B, 0, LAYOUT, CODEC_AES256_GCM)
    value_a, value_b = SEALER.seal(CONTEXT, aad_a, PAYLOAD), SEALER.seal(CONTEXT, aad_b, PAYLOAD[::-1])
    assert opened(value_b, aad=aad_a) is None  # key A's slot now holds key B's value
    assert opened(value_a, aad=aad_b) is None
    assert opened(value_a, aad=aad_a) == PAYLOAD and opened(value_b, aad=aad_b) == PAYLOAD[::-1]


@pytest.mark.parametrize("replayed_as", [(KEY_B, 0, LAYOUT), (KEY_A, 1, LAYOUT), (KEY_A, 0, OTHER_LAYOUT)],
                         ids=["another key", "another rank", "another layout"])
def test_replay_under_another_identity_fails(replayed_as: tuple[bytes, int, bytes]) -> None:
    sealed = SEALER.seal(CONTEXT, sealed_aad(KEY_A, 0, LAYOUT, CODEC_AES256_GCM), PAYLOAD)
    assert opened(sealed, aad=sealed_aad(*replayed_as, CODEC_AES256_GCM)) is None


def test_wrong_master_key_fails() -> None:
    sealed = SEALER.seal(CONTEXT, AAD, PAYLOAD)
    other = bytearray(MASTER)
    other[31] ^= 1
    assert opened(sealed, sealer=Sealer(bytes(other))) is None
    assert opened(sealed, sealer=Sealer(MASTER)) == PAYLOAD  # a new Sealer of the same key opens it


def test_open_into_writes_only_into_out() -> None:
    sealed = SEALER.seal(CONTEXT, AAD, PAYLOAD)
    pool = bytearray(b"\x55" * (len(PAYLOAD) + 64))
    slot = memoryview(pool)[32:32 + len(PAYLOAD)]
    assert SEALER.open_into(CONTEXT, AAD, sealed, slot)
    assert pool == b"\x55" * 32 + PAYLOAD + b"\x55" * 32
    assert not SEALER.open_into(b"other", AAD, sealed, slot)
    assert pool == b"\x55" * 32 + bytes(len(PAYLOAD)) + b"\x55" * 32


def test_master_key_must_be_32_bytes_and_is_never_shown() -> None:
    for bad in (b"", MASTER[:31], MASTER + b"x"):
        with pytest.raises(ValueError):
            Sealer(bad)
    assert MASTER.hex() not in repr(SEALER) and "hidden" in repr(SEALER)


# ---- master keys from configuration ---------------------------------------------------------------

@pytest.mark.parametrize("text", [MASTER.hex().encode(), MASTER.hex().upper().encode(), base64.b64encode(MASTER),
                                  b"  " + MASTER.hex().encode() + b"\n", base64.b64encode(MASTER) + b"\r\n"])
def test_parse_master_key(text: bytes) -> None:
    assert parse_master_key(text) == MASTER


@pytest.mark.parametrize("text", [b"", MASTER, MASTER.hex()[:-2].encode(), MASTER.hex().encode() + b"00",
                                  base64.b64encode(MASTER[:31]), b"correct horse battery staple",
                                  "é".encode() * 32, MASTER.hex().encode()[:32] + b" " + MASTER.hex().encode()[32:]])
def test_parse_master_key_refuses_anything_else_without_quoting_it(text: bytes) -> None:
    with pytest.raises(ValueError) as info:
        parse_master_key(text)
    assert "openssl rand -hex 32" in str(info.value)
    if len(text) > 8:
        assert text.decode("latin-1") not in str(info.value)


def test_load_sealer_off_by_default() -> None:
    assert load_sealer(EncryptionConfig(key_file=None, key_env=None), {"KV_KEY": MASTER.hex()}) is None


def works_like_master(sealer: Sealer | None) -> bool:
    assert sealer is not None
    return opened(sealer.seal(CONTEXT, AAD, PAYLOAD)) == PAYLOAD


def test_load_sealer_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(MASTER.hex() + "\n")
    assert works_like_master(load_sealer(EncryptionConfig(key_file=str(path), key_env=None), {}))
    env = {"KV_MASTER_KEY": base64.b64encode(MASTER).decode()}
    assert works_like_master(load_sealer(EncryptionConfig(key_file=None, key_env="KV_MASTER_KEY"), env))


@pytest.mark.parametrize(("content", "reason"), [
    (None, "cannot read"), (b"", "is empty"), (b"\n", "is empty"), (MASTER, "neither"),
    (base64.b64encode(MASTER[:16]), "holds 16 bytes"), ("dir", "cannot read"),
])
def test_bad_key_file_is_a_config_error(tmp_path: Path, content: bytes | str | None, reason: str) -> None:
    path = tmp_path / "master.key"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_sealer(EncryptionConfig(key_file=str(path), key_env=None), {})
    assert info.value.key == "encryption.key_file"
    assert reason in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(("environ", "reason"), [
    ({}, "not set or empty"), ({"KV_KEY": ""}, "not set or empty"), ({"KV_KEY": "hunter2"}, "neither"),
    ({"KV_KEY": MASTER.hex()[:62]}, "neither"),
])
def test_bad_key_env_is_a_config_error(environ: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_sealer(EncryptionConfig(key_file=None, key_env="KV_KEY"), environ)
    assert info.value.key == "encryption.key_env"
    assert reason in str(info.value) and "KV_KEY" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_key_size_constant() -> None:
    assert MASTER_KEY_BYTES == 32 and SEAL_OVERHEAD_BYTES == 44
