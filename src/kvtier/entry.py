"""The self-describing entry format every byte-storing tier uses (disk, Redis, S3).

An entry is a fixed-size header followed by the payload. The header, little-endian:

====  =====  ===============================================================
off   bytes  field
====  =====  ===============================================================
0     4      magic ``b"KVT1"``
4     2      format version (u16, ``FORMAT_VERSION``)
6     2      codec (u16), bit flags: none (``CODEC_RAW`` = 0), the payload is the chunk's
             bytes; ``CODEC_AES256_GCM`` (1): sealed (``kvtier.crypto``);
             ``CODEC_CACHEGEN`` (2): compressed (``kvtier.compression``), then sealed if 1 is set
8     16     storage key (the chunk's key for this rank)
24    4      tensor-parallel rank (u32)
28    16     layout fingerprint (``KVLayout.fingerprint()``)
44    8      payload_bytes (u64): the stored payload's length (sealed: the sealed length)
52    16     payload checksum: xxh3_128 of the stored payload (sealed: of the sealed bytes, so
             damage is caught without decrypting)
68    8      header checksum: xxh3_64 of bytes 0..68
====  =====  ===============================================================

A sealed payload is authenticated together with ``sealed_aad``: magic, format version, codec,
key, rank and layout fingerprint, so it opens only as the entry of that chunk, rank, layout and
codec (a compressed entry relabelled as uncompressed does not open).

Encoding rule: the field order and sizes are part of the format. Any change bumps
``FORMAT_VERSION``; a reader refuses versions it does not know (``EntryError``), so an old entry
misses instead of being misread.

Pure functions, no I/O, safe from any thread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvtier.errors import EntryError

MAGIC = b"KVT1"
FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_AES256_GCM = 1
CODEC_CACHEGEN = 2
KNOWN_CODECS = (CODEC_RAW, CODEC_AES256_GCM, CODEC_CACHEGEN, CODEC_CACHEGEN | CODEC_AES256_GCM)
CHECKSUM_BYTES = 16

_FIELDS = struct.Struct("<4sHH16sI16sQ16s")
_AAD = struct.Struct("<4sHH16sI16s")
_HEADER_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _FIELDS.size + _HEADER_CHECKSUM.size  # 76

_KEY_BYTES = 16
_FINGERPRINT_BYTES = 16


@dataclass(frozen=True)
class EntryHeader:
    """What an entry says about itself. Sizes and ranges are checked on construction (ValueError)."""

    key: bytes
    rank: int
    layout_fingerprint: bytes
    codec: int
    payload_bytes: int
    payload_checksum: bytes

    def __post_init__(self) -> None:
        _check_len("key", self.key, _KEY_BYTES)
        _check_len("layout_fingerprint", self.layout_fingerprint, _FINGERPRINT_BYTES)
        _check_len("payload_checksum", self.payload_checksum, CHECKSUM_BYTES)
        _check_range("rank", self.rank, 32)
        _check_range("codec", self.codec, 16)
        _check_range("payload_bytes", self.payload_bytes, 64)


def encode_header(header: EntryHeader) -> bytes:
    """The ``HEADER_BYTES`` bytes that describe ``header``."""
    fields = _FIELDS.pack(MAGIC, FORMAT_VERSION, header.codec, header.key, header.rank,
                          header.layout_fingerprint, header.payload_bytes, header.payload_checksum)
    return fields + _HEADER_CHECKSUM.pack(xxhash.xxh3_64_intdigest(fields))


def decode_header(buf: bytes | bytearray | memoryview) -> EntryHeader:
    """Parse the header at the start of ``buf`` (extra bytes after it are ignored).

    Raises ``EntryError`` naming the reason when ``buf`` is short, the magic or version is wrong,
    or the header checksum does not match. Never raises anything else.
    """
    view = memoryview(buf).cast("B")
    if view.nbytes < HEADER_BYTES:
        raise EntryError(f"entry header is short: {view.nbytes} of {HEADER_BYTES} bytes")
    if view[:4] != MAGIC:
        raise EntryError(f"bad entry magic {bytes(view[:4])!r}, expected {MAGIC!r}")
    magic, version, codec, key, rank, fingerprint, payload_bytes, checksum = _FIELDS.unpack_from(view)
    if version != FORMAT_VERSION:
        raise EntryError(f"unknown entry format version {version}, this kvtier reads {FORMAT_VERSION}")
    (stored,) = _HEADER_CHECKSUM.unpack_from(view, _FIELDS.size)
    if stored != xxhash.xxh3_64_intdigest(view[:_FIELDS.size]):
        raise EntryError("entry header checksum mismatch")
    return EntryHeader(key, rank, fingerprint, codec, payload_bytes, checksum)


def sealed_aad(key: bytes, rank: int, layout_fingerprint: bytes, codec: int) -> bytes:
    """The associated data a sealed payload of ``(key, rank)`` in layout ``layout_fingerprint``
    with header codec ``codec`` (``CODEC_AES256_GCM`` set) is authenticated with: magic, format
    version, codec, key, rank, fingerprint, little-endian. Sizes are checked (ValueError)."""
    _check_len("key", key, _KEY_BYTES)
    _check_len("layout_fingerprint", layout_fingerprint, _FINGERPRINT_BYTES)
    _check_range("rank", rank, 32)
    if codec not in KNOWN_CODECS or not codec & CODEC_AES256_GCM:
        raise ValueError(f"codec {codec} is not a sealed codec")
    return _AAD.pack(MAGIC, FORMAT_VERSION, codec, key, rank, layout_fingerprint)


def payload_checksum(payload: bytes | bytearray | memoryview) -> bytes:
    """xxh3_128 of ``payload``'s bytes; reads the buffer in place (no copy). C-contiguous only."""
    return xxhash.xxh3_128_digest(payload)


def check_entry(header: EntryHeader, key: bytes, rank: int, layout_fingerprint: bytes,
                payload: bytes | bytearray | memoryview) -> None:
    """Raise ``EntryError`` unless ``header`` and ``payload`` are the entry the caller asked for.

    Checked in order: key, rank, layout fingerprint, payload length, payload checksum (the only
    check that reads the payload).
    """
    if header.key != key:
        raise EntryError(f"entry key mismatch: file has {header.key.hex()}, expected {key.hex()}")
    if header.rank != rank:
        raise EntryError(f"entry rank mismatch: file has {header.rank}, expected {rank}")
    if header.layout_fingerprint != layout_fingerprint:
        raise EntryError(f"entry layout mismatch: file has {header.layout_fingerprint.hex()}, "
                         f"expected {layout_fingerprint.hex()}")
    num_bytes = memoryview(payload).nbytes
    if header.payload_bytes != num_bytes:
        raise EntryError(f"entry length mismatch: header says {header.payload_bytes} bytes, "
                         f"payload has {num_bytes}")
    if header.payload_checksum != payload_checksum(payload):
        raise EntryError("entry payload checksum mismatch")


def _check_len(name: str, value: bytes, num_bytes: int) -> None:
    if not isinstance(value, bytes) or len(value) != num_bytes:
        raise ValueError(f"{name} must be {num_bytes} bytes")


def _check_range(name: str, value: int, num_bits: int) -> None:
    if not 0 <= value < (1 << num_bits):
        raise ValueError(f"{name} must fit in an unsigned {num_bits}-bit integer, got {value}")
