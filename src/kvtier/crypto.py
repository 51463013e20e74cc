"""Encryption at rest: AES-256-GCM under keys derived from one master key. The only module that
imports ``cryptography``.

The master key (32 bytes) comes from the configuration (``load_sealer``): a file named by
``encryption.key_file``, or the environment variable named by ``encryption.key_env``, holding the
key as text: 64 hex digits (``openssl rand -hex 32``) or base64 of 32 bytes (``openssl rand
-base64 32``); whitespace around it is ignored. Without either, kvtier stores entries in clear.

Keys: every sealed payload has its own AES-256 key,
``HKDF-SHA256(ikm=master key, salt=entry salt, info=b"kvtier-entry-v1|" + context)``, where the
context is the tenant namespace label the caller passes (``b""``: no label, the deployment-wide
context) and the salt is 16 random bytes kept with the payload. So no two namespaces ever share a
key, nothing derived is stored, and since one key seals one payload the random-nonce limit of GCM
(2^32 messages per key) does not bound how much a deployment may write under one master key.

Sealed layout: ``salt (16) || nonce (12) || ciphertext (len(payload)) || tag (16)``, that is
``SEAL_OVERHEAD_BYTES`` (44) more than the payload.

The associated data (AAD) is the caller's: for entries, the header fields that identify the chunk
(``kvtier.entry.sealed_aad``). Opening under another AAD, context or master key fails, so an entry
swapped with another key's, replayed under another key, rank or layout, or altered in any byte is
refused.

``Sealer`` is immutable: every method may be called from any thread, concurrently.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvtier.config import EncryptionConfig
from kvtier.configparts.sources import load_secret

MASTER_KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD_BYTES = SALT_BYTES + NONCE_BYTES + TAG_BYTES  # 44
_HEADER_BYTES = SALT_BYTES + NONCE_BYTES
_INFO_PREFIX = b"kvtier-entry-v1|"
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")

Buffer = bytes | bytearray | memoryview


class Sealer:
    """Seals and opens payloads with AES-256-GCM under keys derived from one master key."""

    def __init__(self, master_key: bytes) -> None:
        """``master_key``: exactly ``MASTER_KEY_BYTES`` bytes (``ValueError`` otherwise)."""
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"a master key is {MASTER_KEY_BYTES} bytes")
        self._master_key = master_key

    def __repr__(self) -> str:
        return "Sealer(master key hidden)"

    @staticmethod
    def sealed_bytes(payload_bytes: int) -> int:
        """Length of the sealed form of a payload of ``payload_bytes`` bytes."""
        return payload_bytes + SEAL_OVERHEAD_BYTES

    def seal(self, context: bytes, aad: bytes, payload: Buffer) -> bytearray:
        """A new buffer: ``payload`` (C-contiguous) encrypted and authenticated with ``aad``
        under the key of ``context`` and a fresh random salt and nonce. Reads ``payload`` in
        place; never fails for any payload, including an empty one."""
        view = memoryview(payload).cast("B")
        sealed = bytearray(self.sealed_bytes(view.nbytes))
        out = memoryview(sealed)
        salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
        out[:SALT_BYTES] = salt
        out[SALT_BYTES:_HEADER_BYTES] = nonce
        encryptor = Cipher(algorithms.AES(self._entry_key(context, salt)), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(aad)
        encryptor.update_into(view, out[_HEADER_BYTES:_HEADER_BYTES + view.nbytes])
        encryptor.finalize()
        out[_HEADER_BYTES + view.nbytes:] = encryptor.tag
        return sealed

    def open_into(self, context: bytes, aad: bytes, sealed: Buffer, out: memoryview) -> bool:
        """Decrypt ``sealed`` straight into ``out`` (writable, C-contiguous, exactly
        ``len(sealed) - SEAL_OVERHEAD_BYTES`` bytes); True when it authenticates under
        ``context`` and ``aad``.

        False, never an exception, for any ``sealed`` bytes that are not such a payload (wrong
        length, altered, sealed under another context, AAD or master key); ``out`` is then
        zeroed, so no unauthenticated plaintext is left in it. Writes nothing outside ``out``.
        """
        view = memoryview(sealed).cast("B")
        target = memoryview(out).cast("B")
        if view.nbytes != self.sealed_bytes(target.nbytes):
            return False
        salt, nonce = bytes(view[:SALT_BYTES]), bytes(view[SALT_BYTES:_HEADER_BYTES])
        tag = bytes(view[view.nbytes - TAG_BYTES:])
        decryptor = Cipher(algorithms.AES(self._entry_key(context, salt)), modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(aad)
        decryptor.update_into(view[_HEADER_BYTES:view.nbytes - TAG_BYTES], target)
        try:
            decryptor.finalize()
        except InvalidTag:
            target[:] = bytes(target.nbytes)
            return False
        return True

    def _entry_key(self, context: bytes, salt: bytes) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO_PREFIX + context)
        return hkdf.derive(self._master_key)


def parse_master_key(text: bytes) -> bytes:
    """The 32-byte master key ``text`` spells: 64 hex digits or base64 of 32 bytes, whitespace
    around it ignored. ``ValueError`` otherwise, with a reason that never quotes ``text``."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("is empty; make a key with: openssl rand -hex 32")
    if _HEX_KEY.fullmatch(stripped.decode("ascii", errors="replace")):
        return bytes.fromhex(stripped.decode("ascii"))
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is neither 64 hex digits nor base64 ({len(stripped)} characters); "
                         "make a key with: openssl rand -hex 32") from None
    if len(decoded) != MASTER_KEY_BYTES:
        raise ValueError(f"holds {len(decoded)} bytes after base64 decoding, a master key is "
                         f"{MASTER_KEY_BYTES}; make one with: openssl rand -hex 32")
    return decoded


def load_sealer(config: EncryptionConfig, environ: Mapping[str, str]) -> Sealer | None:
    """The ``Sealer`` of the configured master key, or None when encryption is off (entries are
    then stored in clear).

    Raises ``ConfigError`` naming ``encryption.key_file`` when the file is missing, unreadable or
    does not hold a key, and ``encryption.key_env`` when the variable is unset, empty or does not
    hold a key. Messages never include key material. Call once per process, at start-up.
    """
    key = load_secret("encryption", config.key_file, config.key_env, environ, parse_master_key)
    return None if key is None else Sealer(key)


