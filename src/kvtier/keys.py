"""Chunk keys: pure, deterministic hashing over canonical little-endian bytes.

A ``Namespace`` binds everything that must match for KV to be reusable: tenant, model identity,
KV layout, tensor-parallel world size, and the key format version. Its 16-byte digest seeds the
hash chain, so any identity mismatch misses instead of colliding.

Chunk ``i`` of a token sequence has key ``h_i = xxh3_128(ns_digest || h_{i-1} || tokens_i)`` with
``h_{-1}`` all zeroes and tokens encoded as little-endian uint32: a key names the whole prefix up to
the end of its chunk. Only full chunks get keys. No Python ``hash``, no seed, no pickle: keys are
identical across processes and machines.

Encoding rule: the fields of ``Namespace`` and their order are part of the encoding. Append only,
and bump ``KEY_FORMAT_VERSION`` on any change.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

KEY_FORMAT_VERSION = 1
KEY_BYTES = 16
_ZERO = bytes(KEY_BYTES)


@dataclass(frozen=True)
class Namespace:
    """Identity that every key of one engine deployment shares."""

    tenant: str
    model: str
    layout_fingerprint: bytes
    world_size: int = 1
    format_version: int = KEY_FORMAT_VERSION
    salt: str = ""  # per-request cache salt (vLLM's ``cache_salt``): isolates within a tenant

    def digest(self) -> bytes:
        parts = [
            struct.pack("<I", self.format_version),
            _text(self.tenant),
            _text(self.model),
            _blob(self.layout_fingerprint),
            struct.pack("<I", self.world_size),
            _text(self.salt),
        ]
        return xxhash.xxh3_128_digest(b"kvtier-ns|" + b"".join(parts))


@dataclass(frozen=True, order=True)
class ChunkKey:
    """The 16-byte key of one chunk; names the prefix up to and including this chunk."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(self.digest)}")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> "ChunkKey":
        return cls(bytes.fromhex(text))

    def for_rank(self, rank: int) -> bytes:
        """Storage key of this chunk's shard on tensor-parallel rank ``rank``."""
        return xxhash.xxh3_128_digest(self.digest + struct.pack("<I", rank))


def chunk_keys(namespace_digest: bytes, token_ids: Sequence[int], chunk_tokens: int,
               start: int = 0, parent: bytes | None = None) -> list[ChunkKey]:
    """Keys of the full chunks of ``token_ids``.

    ``start``/``parent`` continue a chain: pass the number of chunks already hashed and the digest
    of the last one to extend an earlier call without rehashing (used for growing requests).
    """
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    num_chunks = len(token_ids) // chunk_tokens
    prev = parent if parent is not None else _ZERO
    keys: list[ChunkKey] = []
    for i in range(start, num_chunks):
        tokens = token_ids[i * chunk_tokens:(i + 1) * chunk_tokens]
        prev = xxhash.xxh3_128_digest(namespace_digest + prev + struct.pack(f"<{chunk_tokens}I", *tokens))
        keys.append(ChunkKey(prev))
    return keys


def _text(value: str) -> bytes:
    return _blob(value.encode("utf-8"))


def _blob(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value
