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
   K and V are alike, so differences are small), quantised with one scale per (plane, layer,
   channel) to ``bits`` bits in the middle third of the layers, ``bits + 1`` in the first third
   and ``bits - 1`` in the last (early layers matter most; at least 2, at most 8).
4. The quantised symbols are entropy coded (rANS, ``constriction``) under one categorical model
   for the anchors and one per (plane, layer) for the differences; the models' symbol counts
   travel with the data, so decoding needs nothing but the bytes and the layout.

Payload, little-endian (every field is checked on decode; malformed input raises ``EntryError``):

====================  ======================================================================
magic, version        ``b"KVC1"``, u8 = 1
group, layers         u8 ``GROUP_TOKENS`` used, u16 layers
tokens, channels      u32, u32
bits                  u8 per layer
scales                float16 [2 planes, layers, channels] anchors, then the same for differences
anchor counts         u16 [255]
difference counts     u16 [2 ** bits[layer] - 1] per (plane, layer), planes outer
words, stream         u32 count, then that many u32 words of the rANS stream
====================  ======================================================================

Pure functions of their inputs (numpy and constriction release no state between calls): safe
from any thread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import constriction
import numpy as np

from kvtier.errors import EntryError, LayoutError
from kvtier.layout import KVLayout

MAGIC = b"KVC1"
VERSION = 1
GROUP_TOKENS = 16
DEFAULT_BITS = 5
MIN_BITS, MAX_BITS = 2, 8
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
_ANCHOR_MAX = 127  # anchors: symmetric 8-bit levels -127..127
_COUNT_SCALE = 65535
_HEAD = struct.Struct("<4sBBHII")


@dataclass(frozen=True)
class _Shape:
    layers: int
    tokens: int
    channels: int
    group: int


class KVCodec:
    """Compresses and restores whole chunks of one layout (``chunk_tokens`` tokens each)."""

    def __init__(self, layout: KVLayout, chunk_tokens: int, bits: int = DEFAULT_BITS) -> None:
        """``LayoutError`` for a dtype the codec cannot quantise (fp8, uint8); ``ValueError``
        for ``bits`` outside 2..8."""
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
        third = layout.num_layers / 3
        self.layer_bits = tuple(min(MAX_BITS, bits + 1) if layer < third else
                                bits if layer < 2 * third else max(MIN_BITS, bits - 1)
                                for layer in range(layout.num_layers))
        shape = self._shape
        self._fixed_bytes = (_HEAD.size + shape.layers + 2 * 2 * shape.layers * shape.channels * 2
                             + 2 * (2 * _ANCHOR_MAX + 1)
                             + 2 * 2 * sum((1 << b) - 1 for b in self.layer_bits) + 4)

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
        levels = np.array([(1 << (b - 1)) - 1 for b in self.layer_bits], dtype=np.float32)
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

        anchor_symbols = (anchor_q.astype(np.int32) + _ANCHOR_MAX).ravel()
        anchor_counts = _counts(anchor_symbols, 2 * _ANCHOR_MAX + 1)
        segments = [(anchor_symbols, anchor_counts)]
        for plane in range(2):
            for layer, level in enumerate(levels.astype(np.int32)):
                symbols = (diff_q[plane, layer].astype(np.int32) + level).ravel()
                segments.append((symbols, _counts(symbols, 2 * int(level) + 1)))
        coder = constriction.stream.stack.AnsCoder()
        for symbols, counts in reversed(segments):
            coder.encode_reverse(symbols, _model(counts))
        stream = coder.get_compressed()
        parts = [_HEAD.pack(MAGIC, VERSION, shape.group, shape.layers, shape.tokens, shape.channels),
                 bytes(self.layer_bits), anchor_scale.tobytes(), diff_scale.tobytes()]
        parts += [counts.tobytes() for _, counts in segments]
        parts += [struct.pack("<I", stream.size), stream.astype("<u4").tobytes()]
        encoded = b"".join(parts)
        return encoded if len(encoded) < self.chunk_bytes else None

    def decode_into(self, data: bytes | bytearray | memoryview, out: memoryview) -> None:
        """Restore the chunk ``data`` encodes into ``out`` (``chunk_bytes`` writable bytes).

        Raises ``EntryError`` (nothing else, whatever the bytes) when ``data`` is not a chunk of
        this codec's layout, chunk size and bits; unless it returns, ``out`` is unspecified."""
        view = memoryview(data).cast("B")
        shape = self._shape
        if view.nbytes < self._fixed_bytes:
            raise EntryError(f"compressed chunk is short: {view.nbytes} bytes, at least {self._fixed_bytes}")
        magic, version, group, layers, tokens, channels = _HEAD.unpack_from(view)
        if magic != MAGIC or version != VERSION:
            raise EntryError(f"not a compressed chunk of this kvtier (magic {bytes(magic)!r}, version {version})")
        if (group, layers, tokens, channels) != (shape.group, shape.layers, shape.tokens, shape.channels):
            raise EntryError(f"compressed chunk shape (group {group}, {layers} layers, {tokens} tokens, "
                             f"{channels} channels) is not this layout's")
        offset = _HEAD.size
        if tuple(view[offset:offset + layers]) != self.layer_bits:
            raise EntryError("compressed chunk was written with other bits per layer")
        offset += layers
        scales = []
        for _ in range(2):
            scale = np.frombuffer(view, dtype="<f2", count=2 * layers * channels, offset=offset)
            scales.append(scale.astype(np.float32).reshape(2, layers, channels))
            offset += scale.nbytes
        if not all(np.isfinite(scale).all() and (scale >= 0).all() for scale in scales):
            raise EntryError("compressed chunk has a scale that is not a finite non-negative number")
        anchor_scale, diff_scale = scales
        levels = [(1 << (b - 1)) - 1 for b in self.layer_bits]
        sizes = [2 * _ANCHOR_MAX + 1] + [2 * level + 1 for level in levels] * 2
        count_arrays = []
        for size in sizes:
            counts = np.frombuffer(view, dtype="<u2", count=size, offset=offset)
            if not counts.any():
                raise EntryError("compressed chunk has an empty symbol model")
            count_arrays.append(counts)
            offset += counts.nbytes
        (num_words,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if view.nbytes != offset + 4 * num_words:
            raise EntryError(f"compressed chunk length {view.nbytes} does not match its stream of "
                             f"{num_words} words")
        stream = np.frombuffer(view, dtype="<u4", count=num_words, offset=offset).astype(np.uint32)
        num_anchors = 2 * layers * (tokens // group) * channels
        try:
            coder = constriction.stream.stack.AnsCoder(stream)
            anchor_q = coder.decode(_model(count_arrays[0]), num_anchors).astype(np.float32) - _ANCHOR_MAX
            diffs = np.empty((2, layers, tokens, channels), dtype=np.float32)
            index = 1
            for plane in range(2):
                for layer, level in enumerate(levels):
                    symbols = coder.decode(_model(count_arrays[index]), tokens * channels)
                    diffs[plane, layer] = (symbols.astype(np.float32) - level).reshape(tokens, channels)
                    index += 1
        except (ValueError, RuntimeError, AssertionError, OverflowError) as exc:
            raise EntryError(f"compressed chunk stream does not decode: {exc}") from None
        anchor_q = anchor_q.reshape(2, layers, tokens // group, channels)
        values = diffs * diff_scale[:, :, None, :]
        values += np.repeat(anchor_q * anchor_scale[:, :, None, :], group, axis=2)
        out_view = memoryview(out).cast("B")
        if out_view.nbytes != self.chunk_bytes:
            raise ValueError(f"out must be {self.chunk_bytes} bytes, got {out_view.nbytes}")
        words = np.frombuffer(out_view, dtype=_word_dtype(self.layout.dtype))
        for plane, target in zip(values, _planes(words, self.layout, self.blocks)):
            target[...] = _from_float(plane, self.layout.dtype).reshape(target.shape)


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
