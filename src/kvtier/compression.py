"""CacheGen-style KV compression for the slow tiers: delta quantisation plus entropy coding.

Lossy by design, and off unless configured (``remote.compression: cachegen``): a loaded chunk is
close to, not equal to, what the engine computed. ``benchmarks/compression.py`` measures what
that costs on a real model (next-token agreement, KL divergence) and what it saves (bytes,
seconds); docs/configuration.md quotes it.

What a chunk becomes (the ideas of CacheGen, SIGCOMM'24; this code is our own):
1. The chunk's K and V of every layer are viewed as planes ``[layers, tokens, channels]``
   (channels = kv heads x head size), whatever the engine's page layout (``_planes``).
2. Tokens are cut into groups of ``GROUP_TOKENS``; each group's first token is its *anchor*,
   quantised to 8 bits with one scale per (plane, layer, channel).
3. Every token is then coded as its difference from its group's decoded anchor (nearby tokens'
   K and V are alike, so differences are small), quantised to ``bits`` bits with one scale per
   (plane, layer, channel), the same bits in every layer: CacheGen gives early layers more, but
   on SmolLM2-135M that measured worse at the same size (5 bits, rANS: 3.26x with early-layer
   bits, next-token KL 0.014; 3.25x flat, KL 0.005; ``benchmarks/results/compression_coders_cpu.md``).
4. The quantised symbols are entropy coded: as bytes, in one zstd frame (level 1; its Huffman and
   FSE stages code the skewed symbol distribution, its match finder catches repeats). rANS under
   per-(plane, layer) categorical models, closer to CacheGen's arithmetic coding, was measured
   beside it on SmolLM2's real KV and dropped: larger from 4 bits up and 4x slower to decode
   (``benchmarks/results/compression_coders_cpu.md``, commit bed0a35).

Payload, little-endian (every field is checked on decode; malformed input raises ``EntryError``):

====================  ======================================================================
head                  ``b"KVC1"``, u8 version = 1, u8 bits, u8 group tokens, u16 layers,
                      u32 tokens, u32 channels
scales                float16 [2 planes, layers, channels] anchors, then the same for differences
symbols               one zstd frame of one byte per symbol: the anchors [2, layers, groups,
                      channels] plus 127, then the differences [2, layers, tokens, channels]
                      plus the levels
====================  ======================================================================

Pure functions of their inputs: safe from any thread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from kvtier.errors import EntryError, LayoutError
from kvtier.layout import KVLayout

MAGIC = b"KVC1"
VERSION = 1
GROUP_TOKENS = 16
DEFAULT_BITS = 6
MIN_BITS, MAX_BITS = 2, 8
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
_ANCHOR_MAX = 127  # anchors: symmetric 8-bit levels -127..127
_HEAD = struct.Struct("<4sBBBHII")


@dataclass(frozen=True)
class _Shape:
    layers: int
    tokens: int
    channels: int
    group: int


class KVCodec:
    """Compresses and restores whole chunks of one layout (``chunk_tokens`` tokens each)."""

    def __init__(self, layout: KVLayout, chunk_tokens: int, bits: int = DEFAULT_BITS) -> None:
        """``LayoutError`` for a dtype the codec cannot quantise (fp8, uint8) or slots that are not
        ``exact`` (``memory.kv_format``); ``ValueError``
        for ``bits`` outside 2..8."""
        if layout.dtype not in SUPPORTED_DTYPES:
            raise LayoutError(f"KV compression supports {', '.join(SUPPORTED_DTYPES)} KV, not {layout.dtype}")
        if layout.kv_format != "exact":
            raise LayoutError(f"KV compression works on exact slots, not memory.kv_format {layout.kv_format}")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"compression bits must be {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.layout = layout
        self.bits = bits
        self.blocks = layout.blocks_per_chunk(chunk_tokens)
        self.chunk_bytes = layout.chunk_bytes(chunk_tokens)
        group = GROUP_TOKENS if chunk_tokens % GROUP_TOKENS == 0 else chunk_tokens
        self._shape = _Shape(layout.num_layers, chunk_tokens, _plane_channels(layout), min(group, 255))
        self._levels = (1 << (bits - 1)) - 1  # differences: symmetric levels -levels..levels
        self._scale_bytes = 2 * 2 * self._shape.layers * self._shape.channels * 2  # float16 [2, 2, L, C]

    def encode(self, chunk: memoryview) -> bytes | None:
        """The compressed form of ``chunk`` (``chunk_bytes`` bytes in the slot layout), or None
        when it would not be smaller or holds values the format cannot carry (inf, nan, or
        magnitudes beyond float16 scales): the caller then stores the chunk as it is."""
        if memoryview(chunk).nbytes != self.chunk_bytes:
            raise ValueError(f"a chunk is {self.chunk_bytes} bytes, got {memoryview(chunk).nbytes}")
        shape = self._shape
        words = np.frombuffer(chunk, dtype=_word_dtype(self.layout.dtype))
        stack = np.stack([_to_float(plane, self.layout.dtype).reshape(shape.layers, shape.tokens, shape.channels)
                          for plane in _planes(words, self.layout, self.blocks)])  # [2, L, T, C] float32
        if not np.isfinite(stack).all():
            return None
        anchors = stack[:, :, ::shape.group, :]
        anchor_scale = _scale(np.abs(anchors).max(axis=2) / _ANCHOR_MAX)
        if anchor_scale is None:
            return None
        anchor_q = _quantise(anchors, anchor_scale[:, :, None, :], _ANCHOR_MAX)
        diffs = stack - np.repeat(anchor_q * anchor_scale[:, :, None, :], shape.group, axis=2)
        diff_scale = _scale(np.abs(diffs).max(axis=2) / self._levels)
        if diff_scale is None:
            return None
        diff_q = _quantise(diffs, diff_scale[:, :, None, :], self._levels)
        symbols = np.concatenate([(anchor_q + _ANCHOR_MAX).ravel(), (diff_q + self._levels).ravel()])
        body = zstandard.ZstdCompressor(level=1).compress(symbols.astype(np.uint8).tobytes())
        head = _HEAD.pack(MAGIC, VERSION, self.bits, shape.group, shape.layers, shape.tokens, shape.channels)
        encoded = b"".join([head, anchor_scale.tobytes(), diff_scale.tobytes(), body])
        return encoded if len(encoded) < self.chunk_bytes else None

    def decode_into(self, data: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Restore the chunk ``data`` encodes into ``out`` (``chunk_bytes`` writable bytes).

        Raises ``EntryError`` (nothing else, whatever the bytes) when ``data`` is not a chunk of
        this codec's layout, chunk size and bits; unless it returns, ``out`` is unspecified."""
        view = memoryview(data).cast("B")
        shape = self._shape
        if view.nbytes < _HEAD.size + self._scale_bytes:
            raise EntryError(f"compressed chunk is short: {view.nbytes} bytes")
        magic, version, bits, group, layers, tokens, channels = _HEAD.unpack_from(view)
        if magic != MAGIC or version != VERSION:
            raise EntryError(f"not a compressed chunk of this kvtier (magic {bytes(magic)!r}, version {version})")
        if (group, layers, tokens, channels) != (shape.group, shape.layers, shape.tokens, shape.channels):
            raise EntryError(f"compressed chunk shape (group {group}, {layers} layers, {tokens} tokens, "
                             f"{channels} channels) is not this layout's")
        if bits != self.bits:
            raise EntryError(f"compressed chunk was written with {bits} bits, this kvtier uses {self.bits}")
        scales = np.frombuffer(view, dtype="<f2", count=4 * layers * channels, offset=_HEAD.size).astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise EntryError("compressed chunk has a scale that is not a finite non-negative number")
        anchor_scale, diff_scale = scales.reshape(2, 2, layers, channels)
        num_anchors = 2 * layers * (tokens // group) * channels
        symbols = _unpack_symbols(view[_HEAD.size + self._scale_bytes:], num_anchors + 2 * layers * tokens * channels)
        anchor_q = symbols[:num_anchors].astype(np.float32) - _ANCHOR_MAX
        diff_q = symbols[num_anchors:].astype(np.float32) - self._levels
        if anchor_q.max(initial=0) > _ANCHOR_MAX or diff_q.max(initial=0) > self._levels:
            raise EntryError("compressed chunk has a symbol outside its levels")
        values = diff_q.reshape(2, layers, tokens, channels) * diff_scale[:, :, None, :]
        values += np.repeat(anchor_q.reshape(2, layers, tokens // group, channels) * anchor_scale[:, :, None, :],
                            group, axis=2)
        out_view = memoryview(out).cast("B")
        if out_view.nbytes != self.chunk_bytes:
            raise ValueError(f"out must be {self.chunk_bytes} bytes, got {out_view.nbytes}")
        words = np.frombuffer(out_view, dtype=_word_dtype(self.layout.dtype))
        for plane, target in zip(values, _planes(words, self.layout, self.blocks)):
            target[...] = _from_float(plane, self.layout.dtype).reshape(target.shape)


def _unpack_symbols(body: memoryview, total: int) -> np.ndarray:
    """The ``total`` one-byte symbols of the zstd frame that is exactly ``body``."""
    try:
        if zstandard.frame_content_size(body) != total:  # checked first: bounds what is inflated
            raise EntryError(f"compressed chunk stream does not hold {total} symbols")
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        raw = decompressor.decompress(body)
    except zstandard.ZstdError as exc:
        raise EntryError(f"compressed chunk stream does not decode: {exc}") from None
    if len(raw) != total or not decompressor.eof or decompressor.unused_data:
        raise EntryError("compressed chunk stream is truncated or followed by other bytes")
    return np.frombuffer(raw, dtype=np.uint8)


def _planes(words: np.ndarray, layout: KVLayout, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of a chunk's elements (slot layout) as ``[layers, blocks, block, heads, size]``
    views: no copy, and assigning to them writes the chunk."""
    layers, heads, size, block = layout.num_layers, layout.num_kv_heads, layout.head_size, layout.block_size
    if layout.kind == "cpu_lbhnc":
        # page (block, head): K transposed [size, block], then V [block, size]
        pages = words.reshape(layers, blocks, heads, 2, block * size)
        k = pages[:, :, :, 0].reshape(layers, blocks, heads, size, block).transpose(0, 1, 4, 2, 3)
        v = pages[:, :, :, 1].reshape(layers, blocks, heads, block, size).transpose(0, 1, 3, 2, 4)
        return k, v
    if layout.kind == "packed_nhd":  # page: [block][heads][K | V]
        pages = words.reshape(layers, blocks, block, heads, 2 * size)
        return pages[..., :size], pages[..., size:]
    if layout.kind == "packed_hnd":  # page: [heads][block][K | V]
        pages = words.reshape(layers, blocks, heads, block, 2 * size).transpose(0, 1, 3, 2, 4)
        return pages[..., :size], pages[..., size:]
    if layout.kind == "mla":  # page: [block][latent]; scales are per channel, so halves serve as planes
        pages = words.reshape(layers, blocks, block, 1, size)
        return pages[..., :size // 2], pages[..., size // 2:]
    # KVLayout refuses other kinds; a new kind must be taught here before it is compressed
    raise LayoutError(f"KV compression does not know layout {layout.kind!r}")


def _plane_channels(layout: KVLayout) -> int:
    """Channels of one of the two planes the codec quantises: K or V over all heads, or half of
    MLA's latent (which must then have an even width)."""
    if layout.kind == "mla":
        if layout.head_size % 2:
            raise LayoutError(f"KV compression needs an even MLA latent width, got {layout.head_size}")
        return layout.head_size // 2
    return layout.num_kv_heads * layout.head_size


def _word_dtype(dtype: str) -> str:
    return "<f4" if dtype == "float32" else "<u2"


def _to_float(words: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(words).astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return np.asarray(words).view(np.float16).astype(np.float32)
    return np.asarray(words, dtype=np.float32)


def _from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # round to nearest even, as torch does
        bits = values.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    return values.astype(np.float32)


def _scale(raw: np.ndarray) -> np.ndarray | None:
    """Scales as float16 (what the payload carries), rounded up so no value overflows its levels;
    None when one does not fit float16."""
    with np.errstate(over="ignore"):
        scale = raw.astype(np.float16)
    low = scale.astype(np.float32) < raw
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    return scale if np.isfinite(scale).all() else None


def _quantise(values: np.ndarray, scale: np.ndarray, levels: int) -> np.ndarray:
    scale32 = scale.astype(np.float32)
    safe = np.where(scale32 > 0, scale32, np.float32(1))
    return np.clip(np.rint(values / safe), -levels, levels).astype(np.float32)
