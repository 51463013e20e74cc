"""Entry framing shared by the byte-storing tiers (disk, remote): header plus stored payload,
raw or sealed, and the checks a read makes before any byte counts as data.

With a ``Sealer`` the stored payload is the chunk sealed under the namespace's key with the
chunk's identity as associated data (codec ``CODEC_AES256_GCM``); without, the chunk's bytes
(``CODEC_RAW``). A reader accepts only the codec its own configuration writes: with encryption on,
a clear entry (which anyone with write access to the store could forge) is refused, and with it
off a sealed one is unreadable. Pure functions, safe from any thread.
"""

from __future__ import annotations

from kvtier.crypto import Sealer
from kvtier.entry import CODEC_AES256_GCM, CODEC_RAW, EntryHeader, check_entry, decode_header, \
    encode_header, payload_checksum, sealed_aad
from kvtier.errors import EntryError


def stored_bytes(payload_bytes: int, sealer: Sealer | None) -> int:
    """Length of the stored payload of a chunk of ``payload_bytes`` bytes."""
    return payload_bytes if sealer is None else sealer.sealed_bytes(payload_bytes)


def frame(key: bytes, rank: int, layout_fingerprint: bytes, payload: memoryview, sealer: Sealer | None,
          namespace: str) -> tuple[bytes, memoryview]:
    """``(header, stored payload)`` of the entry of ``(key, rank)``; ``payload`` is read in
    place and, without a sealer, is itself the stored payload (no copy)."""
    stored = payload
    codec = CODEC_RAW
    if sealer is not None:
        aad = sealed_aad(key, rank, layout_fingerprint)
        stored = memoryview(sealer.seal(namespace.encode("utf-8"), aad, payload))
        codec = CODEC_AES256_GCM
    header = EntryHeader(key, rank, layout_fingerprint, codec, stored.nbytes, payload_checksum(stored))
    return encode_header(header), stored


def unframe_into(header: bytes | bytearray | memoryview, stored: memoryview, key: bytes, rank: int,
                 layout_fingerprint: bytes, out: memoryview, sealer: Sealer | None, namespace: str) -> None:
    """Check an entry read as ``header`` bytes and ``stored`` payload; on return ``out`` holds
    the chunk. Without a sealer ``stored`` must be ``out`` itself (read in place).

    Raises ``EntryError`` (and nothing else, whatever the bytes) when the header is malformed,
    of another codec, key, rank or layout, the length or checksum does not match, or the sealed
    payload does not authenticate. Unless it returns, the content of ``out`` is unspecified.
    """
    decoded = decode_header(header)
    expected_codec = CODEC_RAW if sealer is None else CODEC_AES256_GCM
    if decoded.codec != expected_codec:
        raise EntryError(f"entry codec {decoded.codec}, this kvtier reads codec {expected_codec} "
                         f"(encryption {'on' if sealer is not None else 'off'})")
    check_entry(decoded, key, rank, layout_fingerprint, stored)
    if sealer is None:
        return
    aad = sealed_aad(key, rank, layout_fingerprint)
    if not sealer.open_into(namespace.encode("utf-8"), aad, stored, out):
        raise EntryError("sealed entry does not authenticate (altered, swapped, another namespace "
                         "or another master key)")
