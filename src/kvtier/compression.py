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
   (plane, layer, channel). The payload carries bits per layer; kvtier writes the same for every
   layer: CacheGen gives early layers more, but on SmolLM2-135M that measured worse at the same
   size (next-token KL 0.022 against 0.009; ``benchmarks/results/compression_cpu.md``).
4. The quantised symbols are entropy coded, by one of two coders (a field of the payload; a
   reader decodes both): ``CODER_RANS``, rANS (``constriction``) under one categorical model for
   the anchors and one per (plane, layer) for the differences, whose symbol counts travel with
   the data: the smallest; or ``CODER_ZSTD``, the symbols as bytes in one zstd frame (Huffman and
   FSE stages): a few percent larger, several times faster to decode.
   ``benchmarks/compression.py`` measures both.

Payload, little-endian (every field is checked on decode; malformed input raises ``EntryError``):

====================  ======================================================================
head                  ``b"KVC1"``, u8 version = 1, u8 coder, u8 group tokens, u16 layers,
                      u32 tokens, u32 channels
bits                  u8 per layer
scales                float16 [2 planes, layers, channels] anchors, then the same for differences
rANS body             u16 counts [alphabet] per segment (anchors: 255; differences of (plane,
                      layer): 2 ** bits[layer] - 1, planes outer), u32 word count, the words
zstd body             one zstd frame of every segment's symbols as u8, in the same order
====================  ======================================================================

Pure functions of their inputs: safe from any thread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import constriction
import numpy as np
import zstandard

from kvtier.errors import EntryError, LayoutError
from kvtier.layout import KVLayout

MAGIC = b"KVC1"
VERSION = 1
CODER_RANS = 0  # smallest: rANS under per-segment categorical models (constriction)
CODER_ZSTD = 1  # fastest to decode: the symbols as bytes in one zstd frame
GROUP_TOKENS = 16
DEFAULT_BITS = 5
MIN_BITS, MAX_BITS = 2, 8
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
_ANCHOR_MAX = 127  # anchors: symmetric 8-bit levels -127..127
_COUNT_SCALE = 65535
_HEAD = struct.Struct("<4sBBBHII")


@dataclass(frozen=True)
class _Shape:
    layers: int
    tokens: int
    channels: int
    group: int


class KVCodec:
    """Compresses and restores whole chunks of one layout (``chunk_tokens`` tokens each)."""

    def __init__(self, layout: KVLayout, chunk_tokens: int, bits: int = DEFAULT_BITS,
                 coder: int = CODER_RANS) -> None:
        """``LayoutError`` for a dtype the codec cannot quantise (fp8, uint8); ``ValueError``
        for ``bits`` outside 2..8 or an unknown ``coder``. ``coder`` is what ``encode`` writes;
        ``decode_into`` reads both."""
        if coder not in (CODER_RANS, CODER_ZSTD):
            raise ValueError(f"unknown entropy coder {coder}")
        self.coder = coder
        if layout.dtype not in SUPPORTED_DTYPES:
            raise LayoutError(f"KV compression supports {', '.join(SUPPORTED_DTYPES)} KV, not {layout.dtype}")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"compression bits must be {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.layout = layout
        self.blocks = layout.blocks_per_chunk(chunk_tokens)
        self.chunk_bytes = layout.chunk_bytes(chunk_tokens)
        group = GROUP_TOKENS if chunk_tokens % GROUP_TOKENS == 0 else chunk_tokens
        self._shape = _Shape(layout.num_layers, chunk_tokens, layout.num_kv_heads * layout.head_size,
                             min(group, 255))
        self.layer_bits = (bits,) * layout.num_layers
        self._levels = [(1 << (b - 1)) - 1 for b in self.layer_bits]
        self._alphabets = [2 * _ANCHOR_MAX + 1] + [2 * level + 1 for level in self._levels] * 2
        self._scale_bytes = 2 * 2 * self._shape.layers * self._shape.channels * 2  # float16 [2, 2, L, C]

    @property
    def max_encoded_bytes(self) -> int:
        """No encoded chunk is longer (``encode`` declines, returning None, rather than grow)."""
        return self.chunk_bytes

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
        levels = np.array(self._levels, dtype=np.float32)
        anchors = stack[:, :, ::shape.group, :]
        anchor_scale = _scale(np.abs(anchors).max(axis=2) / _ANCHOR_MAX)
        if anchor_scale is None:
            return None
        anchor_q = _quantise(anchors, anchor_scale[:, :, None, :], _ANCHOR_MAX)
        diffs = stack - np.repeat(anchor_q * anchor_scale[:, :, None, :], shape.group, axis=2)
        diff_scale = _scale(np.abs(diffs).max(axis=2) / levels[None, :, None])
        if diff_scale is None:
            return None
        diff_q = _quantise(diffs, diff_scale[:, :, None, :], levels[None, :, None, None])
        segments = [anchor_q.astype(np.int32).ravel() + _ANCHOR_MAX]
        segments += [diff_q[plane, layer].astype(np.int32).ravel() + level
                     for plane in range(2) for layer, level in enumerate(self._levels)]
        head = _HEAD.pack(MAGIC, VERSION, self.coder, shape.group, shape.layers, shape.tokens, shape.channels)
        body = _rans_pack(segments, self._alphabets) if self.coder == CODER_RANS else _zstd_pack(segments)
        encoded = b"".join([head, bytes(self.layer_bits), anchor_scale.tobytes(), diff_scale.tobytes(), body])
        return encoded if len(encoded) < self.chunk_bytes else None

    def decode_into(self, data: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Restore the chunk ``data`` encodes into ``out`` (``chunk_bytes`` writable bytes).

        Raises ``EntryError`` (nothing else, whatever the bytes) when ``data`` is not a chunk of
        this codec's layout, chunk size and bits (either coder is read); unless it returns,
        ``out`` is unspecified."""
        view = memoryview(data).cast("B")
        shape = self._shape
        if view.nbytes < _HEAD.size + shape.layers + self._scale_bytes:
            raise EntryError(f"compressed chunk is short: {view.nbytes} bytes")
        magic, version, coder, group, layers, tokens, channels = _HEAD.unpack_from(view)
        if magic != MAGIC or version != VERSION or coder not in (CODER_RANS, CODER_ZSTD):
            raise EntryError(f"not a compressed chunk of this kvtier (magic {bytes(magic)!r}, version {version}, "
                             f"coder {coder})")
        if (group, layers, tokens, channels) != (shape.group, shape.layers, shape.tokens, shape.channels):
            raise EntryError(f"compressed chunk shape (group {group}, {layers} layers, {tokens} tokens, "
                             f"{channels} channels) is not this layout's")
        offset = _HEAD.size
        if tuple(view[offset:offset + layers]) != self.layer_bits:
            raise EntryError("compressed chunk was written with other bits per layer")
        offset += layers
        scales = np.frombuffer(view, dtype="<f2", count=4 * layers * channels, offset=offset).astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise EntryError("compressed chunk has a scale that is not a finite non-negative number")
        anchor_scale, diff_scale = scales.reshape(2, 2, layers, channels)
        body = view[offset + self._scale_bytes:]
        lengths = [2 * layers * (tokens // group) * channels] + [tokens * channels] * (2 * layers)
        unpack = _rans_unpack if coder == CODER_RANS else _zstd_unpack
        segments = unpack(body, self._alphabets, lengths)
        for segment, alphabet in zip(segments, self._alphabets):
            if segment.size and int(segment.max()) >= alphabet:
                raise EntryError("compressed chunk has a symbol outside its alphabet")
        anchor_q = segments[0].astype(np.float32).reshape(2, layers, tokens // group, channels) - _ANCHOR_MAX
        diffs = np.empty((2, layers, tokens, channels), dtype=np.float32)
        for index, symbols in enumerate(segments[1:]):
            plane, layer = divmod(index, layers)
            diffs[plane, layer] = (symbols.astype(np.float32) - self._levels[layer]).reshape(tokens, channels)
        values = diffs * diff_scale[:, :, None, :]
        values += np.repeat(anchor_q * anchor_scale[:, :, None, :], group, axis=2)
        out_view = memoryview(out).cast("B")
        if out_view.nbytes != self.chunk_bytes:
            raise ValueError(f"out must be {self.chunk_bytes} bytes, got {out_view.nbytes}")
        words = np.frombuffer(out_view, dtype=_word_dtype(self.layout.dtype))
        for plane, target in zip(values, _planes(words, self.layout, self.blocks)):
            target[...] = _from_float(plane, self.layout.dtype).reshape(target.shape)


def _rans_pack(segments: list[np.ndarray], alphabets: list[int]) -> bytes:
    """Counts of every segment's model, then one rANS stream of all segments (u32 words)."""
    counts = [_counts(symbols, alphabet) for symbols, alphabet in zip(segments, alphabets)]
    coder = constriction.stream.stack.AnsCoder()
    for symbols, model_counts in zip(reversed(segments), reversed(counts)):
        coder.encode_reverse(symbols, _model(model_counts))
    stream = coder.get_compressed()
    return b"".join([*(c.tobytes() for c in counts), struct.pack("<I", stream.size), stream.astype("<u4").tobytes()])


def _rans_unpack(body: memoryview, alphabets: list[int], lengths: list[int]) -> list[np.ndarray]:
    offset = 0
    models = []
    for alphabet in alphabets:
        if body.nbytes < offset + 2 * alphabet + 4:
            raise EntryError("compressed chunk is short (symbol models)")
        counts = np.frombuffer(body, dtype="<u2", count=alphabet, offset=offset)
        if not counts.any():
            raise EntryError("compressed chunk has an empty symbol model")
        models.append(_model(counts))
        offset += counts.nbytes
    (num_words,) = struct.unpack_from("<I", body, offset)
    offset += 4
    if body.nbytes != offset + 4 * num_words:
        raise EntryError(f"compressed chunk length does not match its stream of {num_words} words")
    stream = np.frombuffer(body, dtype="<u4", count=num_words, offset=offset).astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(stream)
        return [coder.decode(model, length) for model, length in zip(models, lengths)]
    except (ValueError, RuntimeError, AssertionError, OverflowError) as exc:
        raise EntryError(f"compressed chunk stream does not decode: {exc}") from None


def _zstd_pack(segments: list[np.ndarray]) -> bytes:
    """All segments' symbols as bytes, in one zstd frame (level 1: its Huffman and FSE stages do
    the entropy coding; the match finder costs little at this level)."""
    symbols = np.concatenate(segments).astype(np.uint8)
    return zstandard.ZstdCompressor(level=1).compress(symbols.tobytes())


def _zstd_unpack(body: memoryview, alphabets: list[int], lengths: list[int]) -> list[np.ndarray]:
    total = sum(lengths)
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=total)
    except zstandard.ZstdError as exc:
        raise EntryError(f"compressed chunk stream does not decode: {exc}") from None
    if len(raw) != total:
        raise EntryError(f"compressed chunk stream holds {len(raw)} symbols, expected {total}")
    symbols = np.frombuffer(raw, dtype=np.uint8)
    bounds = np.cumsum([0, *lengths])
    return [symbols[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


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
    if layout.kind == "cuda_flash":
        pages = words.reshape(layers, 2, blocks, block, heads, size)
        return pages[:, 0], pages[:, 1]
    # KVLayout refuses other kinds; a new kind must be taught here before it is compressed
    raise LayoutError(f"KV compression does not know layout {layout.kind!r}")


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


def _quantise(values: np.ndarray, scale: np.ndarray, levels: np.ndarray | int) -> np.ndarray:
    scale32 = scale.astype(np.float32)
    safe = np.where(scale32 > 0, scale32, np.float32(1))
    return np.clip(np.rint(values / safe), -levels, levels).astype(np.float32)


def _counts(symbols: np.ndarray, size: int) -> np.ndarray:
    """Histogram of ``symbols`` as the u16 counts the payload carries: every symbol present keeps
    a non-zero count (rounded up), so the model can code it."""
    counts = np.bincount(symbols, minlength=size).astype(np.uint64)
    total = max(int(counts.sum()), 1)
    return ((counts * _COUNT_SCALE + total - 1) // total).astype("<u2")


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    probabilities = counts.astype(np.float64)
    return constriction.stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)
