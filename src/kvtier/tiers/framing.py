"""Entry framing shared by the byte-storing tiers (disk, remote): header plus stored payload,
raw, compressed and/or sealed, and the checks a read makes before any byte counts as data.

Writing: with a ``KVCodec`` the chunk is compressed (``CODEC_CACHEGEN``; the codec may decline a
chunk that would not shrink, which is then stored as it is); with a ``Sealer`` the result is sealed
under the namespace's key with the chunk's identity and the header's codec as associated data
(``CODEC_AES256_GCM``). Reading: encryption must match the reader's own configuration (with it on,
a clear entry, which anyone with write access to the store could forge, is refused; with it off a
sealed one is unreadable); a compressed entry needs a codec, an uncompressed one is read either way.
Pure functions, safe from any thread.
"""

from __future__ import annotations

from kvtier.compression import KVCodec
from kvtier.crypto import SEAL_OVERHEAD_BYTES, Sealer
from kvtier.entry import CODEC_AES256_GCM, CODEC_CACHEGEN, CODEC_RAW, KNOWN_CODECS, EntryHeader, check_entry, \
    decode_header, encode_header, payload_checksum, sealed_aad
from kvtier.errors import EntryError, UnreadableEntryError


def stored_bytes(payload_bytes: int, sealer: Sealer | None) -> int:
    """Length of the stored payload of an uncompressed chunk of ``payload_bytes`` bytes, which is
    also the most a compressed one may take (a codec never grows a chunk)."""
    return payload_bytes if sealer is None else sealer.sealed_bytes(payload_bytes)


def frame(key: bytes, rank: int, layout_fingerprint: bytes, payload: memoryview, sealer: Sealer | None,
          namespace: str, codec: KVCodec | None) -> tuple[bytes, memoryview]:
    """``(header, stored payload)`` of the entry of ``(key, rank)``; ``payload`` is read in
    place and, without a sealer or codec, is itself the stored payload (no copy)."""
    stored = payload
    flags = CODEC_RAW
    if codec is not None:
        encoded = codec.encode(payload)
        if encoded is not None:
            stored, flags = memoryview(encoded), CODEC_CACHEGEN
    if sealer is not None:
        flags |= CODEC_AES256_GCM
        stored = memoryview(sealer.seal(namespace.encode("utf-8"), sealed_aad(key, rank, layout_fingerprint, flags),
                                        stored))
    header = EntryHeader(key, rank, layout_fingerprint, flags, stored.nbytes, payload_checksum(stored))
    return encode_header(header), stored


def check_readable(header: bytes | bytearray | memoryview, sealer: Sealer | None,
                   codec: KVCodec | None) -> EntryHeader:
    """The decoded ``header``; raises ``UnreadableEntryError`` when it is well formed but names
    an encryption or compression setting this reader does not have (readers whose size check
    fails call it first: such an entry is the right size for its writer, not for this reader).
    Malformed headers raise ``EntryError``."""
    decoded = decode_header(header)
    if decoded.codec not in KNOWN_CODECS:
        raise EntryError(f"unknown entry codec {decoded.codec}")
    sealed, compressed = bool(decoded.codec & CODEC_AES256_GCM), bool(decoded.codec & CODEC_CACHEGEN)
    if sealed != (sealer is not None):
        raise UnreadableEntryError(f"entry is {'sealed' if sealed else 'in clear'}, this kvtier has encryption "
                                   f"{'on' if sealer is not None else 'off'}")
    if compressed and codec is None:
        raise UnreadableEntryError("entry is compressed and this kvtier's compression is off")
    return decoded


def unframe_into(header: bytes | bytearray | memoryview, stored: memoryview, key: bytes, rank: int,
                 layout_fingerprint: bytes, out: memoryview, sealer: Sealer | None, namespace: str,
                 codec: KVCodec | None) -> None:
    """Check an entry read as ``header`` bytes and ``stored`` payload; on return ``out`` holds
    the chunk. A raw entry is read in place when ``stored`` is ``out`` itself, else copied.

    Raises ``EntryError`` (and nothing else, whatever the bytes) when the header is malformed,
    of a codec this reader cannot or must not read, of another key, rank or layout, the length or
    checksum does not match, the sealed payload does not authenticate or the compressed one does
    not decode. Unless it returns, the content of ``out`` is unspecified.
    """
    decoded = check_readable(header, sealer, codec)
    compressed = bool(decoded.codec & CODEC_CACHEGEN)
    check_entry(decoded, key, rank, layout_fingerprint, stored)
    plain = stored
    if sealer is not None:
        plain = out if not compressed else memoryview(bytearray(max(0, stored.nbytes - SEAL_OVERHEAD_BYTES)))
        aad = sealed_aad(key, rank, layout_fingerprint, decoded.codec)
        if not sealer.open_into(namespace.encode("utf-8"), aad, stored, plain):
            raise UnreadableEntryError("sealed entry does not authenticate (altered, swapped, another namespace "
                             "or another master key)")
    if compressed:
        assert codec is not None
        codec.decode_into(plain, out)
    elif plain is not out:
        if plain.nbytes != out.nbytes:
            raise EntryError(f"entry holds {plain.nbytes} bytes, a chunk is {out.nbytes}")
        out[:] = plain
