"""CacheGen-style compression (kvtier.compression): error bounds, layouts, declines, framing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.compression import GROUP_TOKENS, KVCodec, _from_float, _plane_channels, _planes, _to_float
from kvtier.crypto import Sealer
from kvtier.entry import CODEC_AES256_GCM, CODEC_CACHEGEN, CODEC_RAW, decode_header, encode_header
from kvtier.errors import EntryError, LayoutError
from kvtier.layout import KVLayout
from kvtier.tiers.framing import frame, unframe_into

KINDS = ("cpu_lbhnc", "packed_nhd", "packed_hnd", "mla")
DTYPES = ("bfloat16", "float16", "float32")
KEY = bytes(range(16))
SEALER = Sealer(bytes(range(32)))
NAMESPACE = "tenant-a"


def chunk_of(layout: KVLayout, tokens: int, values: np.ndarray) -> bytes:
    """The chunk (slot layout) holding ``values`` [2 planes, layers, tokens, channels]."""
    blocks = tokens // layout.block_size
    words = np.zeros(layout.chunk_bytes(tokens) // layout.dtype_bytes,
                     dtype="<f4" if layout.dtype == "float32" else "<u2")
    for plane, target in zip(values, _planes(words, layout, blocks)):
        target[...] = _from_float(plane, layout.dtype).reshape(target.shape)
    return words.tobytes()


def values_of(layout: KVLayout, tokens: int, chunk: bytes | bytearray) -> np.ndarray:
    """The inverse of ``chunk_of``: [2, layers, tokens, channels] float32."""
    words = np.frombuffer(chunk, dtype="<f4" if layout.dtype == "float32" else "<u2")
    channels = _plane_channels(layout)
    return np.stack([_to_float(plane, layout.dtype).reshape(layout.num_layers, tokens, channels)
                     for plane in _planes(words, layout, tokens // layout.block_size)])


def kv_like(rng: np.random.Generator, layers: int, tokens: int, channels: int, scale: float) -> np.ndarray:
    """Values shaped like KV: a per-channel offset (some channels large), drifting over tokens."""
    offset = rng.normal(0, scale, (2, layers, 1, channels)) * rng.choice([1, 1, 1, 8], (2, layers, 1, channels))
    drift = np.cumsum(rng.normal(0, scale / 10, (2, layers, tokens, channels)), axis=2)
    return (offset + drift).astype(np.float32)


def error_bound(codec: KVCodec, values: np.ndarray) -> np.ndarray:
    """Per (plane, layer, channel): the most any decoded value may differ from ``values`` (as
    stored in the dtype). A difference is coded against a decoded anchor (off by at most half an
    anchor step), so it spans at most the channel's range plus that; its own step is that span
    over the layer's levels; decoding rounds to the dtype once more."""
    levels = (1 << (codec.bits - 1)) - 1
    magnitude = np.abs(values).max(axis=2).astype(np.float64)
    spread = (values.max(axis=2) - values.min(axis=2)).astype(np.float64)
    step = (spread + magnitude / 127) / levels * 1.01 + 1e-30
    rounding = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-23}[codec.layout.dtype]
    return step / 2 + magnitude * (1 + 1 / 127) * rounding * 1.01 + 1e-6


def layout_of(kind: str, layers: int, heads: int, head_size: int, block: int, dtype: str) -> KVLayout:
    """For MLA: one latent of ``2 * heads * head_size`` per token, quantised as two halves."""
    if kind == "mla":
        return KVLayout(kind, layers, 1, 2 * heads * head_size, block, dtype)
    return KVLayout(kind, layers, heads, head_size, block, dtype)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES), layers=st.integers(1, 4),
       heads=st.integers(1, 3), head_size=st.sampled_from([8, 16, 32]), block=st.sampled_from([8, 16]),
       blocks=st.integers(1, 4), bits=st.integers(2, 8), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([0.01, 1.0, 30.0]))
def test_every_decoded_value_is_within_the_quantisation_bound(kind: str, dtype: str, layers: int, heads: int,
                                                              head_size: int, block: int, blocks: int, bits: int,
                                                              seed: int, scale: float) -> None:
    layout = layout_of(kind, layers, heads, head_size, block, dtype)
    tokens = block * blocks
    codec = KVCodec(layout, tokens, bits)
    original = values_of(layout, tokens, chunk_of(layout, tokens, kv_like(np.random.default_rng(seed), layers,
                                                                           tokens, _plane_channels(layout), scale)))
    encoded = codec.encode(memoryview(chunk_of(layout, tokens, original)))
    if encoded is None:  # declined: only when it would not be smaller
        assert codec._scale_bytes >= layout.chunk_bytes(tokens) // 8
        return
    assert len(encoded) < layout.chunk_bytes(tokens)
    out = bytearray(layout.chunk_bytes(tokens))
    codec.decode_into(encoded, memoryview(out))
    error = np.abs(values_of(layout, tokens, out) - original).max(axis=2)
    assert (error <= error_bound(codec, original)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_planes_follow_the_engine_page_layout(kind: str) -> None:
    # Element (layer, plane, token, head, dim) lands where the engine keeps it: on CPU, K is
    # stored transposed in its (block, head) page; on CUDA, K and V are packed in the last dim of
    # a [block, heads] (NHD) or [heads, block] (HND) page.
    layout = layout_of(kind, 2, 2, 4, 8, "float32")
    blocks, tokens = 2, 16
    words = np.arange(layout.chunk_bytes(tokens) // 4, dtype="<f4")
    k, v = _planes(words, layout, blocks)
    layer, block, offset, head, dim = 1, 1, 3, 1, 2
    page = layout.block_elems_per_layer  # elements of one block of one layer
    if kind == "mla":  # page [block][latent of 16]: the first half, then the second
        base = (layer * blocks + block) * page + offset * 16
        assert k[layer, block, offset, 0, 4 * head + dim] == base + 4 * head + dim
        assert v[layer, block, offset, 0, 4 * head + dim] == base + 8 + 4 * head + dim
    elif kind == "cpu_lbhnc":
        base = (layer * blocks + block) * page + head * 2 * 8 * 4
        assert k[layer, block, offset, head, dim] == base + dim * 8 + offset
        assert v[layer, block, offset, head, dim] == base + 8 * 4 + offset * 4 + dim
    else:
        base = (layer * blocks + block) * page
        row = offset * 2 + head if kind == "packed_nhd" else head * 8 + offset  # (token, head) in the page
        assert k[layer, block, offset, head, dim] == base + row * 2 * 4 + dim
        assert v[layer, block, offset, head, dim] == base + row * 2 * 4 + 4 + dim


def test_real_sized_chunk_at_5_bits_shrinks_at_least_three_times() -> None:
    # SmolLM2-135M on vLLM-CPU: 30 layers, 3 KV heads of 64, bf16, 256-token chunks.
    layout = KVLayout("cpu_lbhnc", 30, 3, 64, 16, "bfloat16")
    chunk = chunk_of(layout, 256, kv_like(np.random.default_rng(1), 30, 256, 192, 1.0))
    encoded = KVCodec(layout, 256, bits=5).encode(memoryview(chunk))
    assert encoded is not None and len(chunk) / len(encoded) > 3


def test_groups_are_block_multiples_or_the_whole_chunk() -> None:
    assert KVCodec(KVLayout("packed_nhd", 1, 1, 8, 16, "float16"), 64)._shape.group == GROUP_TOKENS
    assert KVCodec(KVLayout("packed_nhd", 1, 1, 8, 24, "float16"), 24)._shape.group == 24


def test_values_the_format_cannot_carry_are_declined() -> None:
    layout = KVLayout("packed_nhd", 2, 2, 16, 16, "float32")
    good = kv_like(np.random.default_rng(2), 2, 16, 32, 1.0)
    codec = KVCodec(layout, 16)
    assert codec.encode(memoryview(chunk_of(layout, 16, good))) is not None
    for bad in (np.inf, np.nan, 1e30):  # 1e30: its scale does not fit float16
        values = good.copy()
        values[1, 1, 3, 7] = bad
        assert codec.encode(memoryview(chunk_of(layout, 16, values))) is None


def test_a_chunk_too_small_to_shrink_is_declined() -> None:
    layout = KVLayout("packed_nhd", 1, 1, 2, 8, "bfloat16")  # 64 bytes: scales and frame outgrow them
    chunk = chunk_of(layout, 8, np.random.default_rng(5).normal(0, 1, (2, 1, 8, 2)).astype(np.float32))
    assert KVCodec(layout, 8).encode(memoryview(chunk)) is None


def test_unsupported_dtypes_and_bits_are_refused() -> None:
    with pytest.raises(LayoutError, match="float8_e4m3fn"):
        KVCodec(KVLayout("packed_nhd", 1, 1, 8, 16, "float8_e4m3fn"), 16)
    with pytest.raises(ValueError, match="2..8"):
        KVCodec(KVLayout("packed_nhd", 1, 1, 8, 16, "float16"), 16, bits=9)


def test_a_chunk_of_another_shape_or_bits_is_refused() -> None:
    layout = KVLayout("packed_nhd", 2, 2, 16, 16, "bfloat16")
    chunk = chunk_of(layout, 32, kv_like(np.random.default_rng(3), 2, 32, 32, 1.0))
    encoded = KVCodec(layout, 32).encode(memoryview(chunk))
    assert encoded is not None
    out = memoryview(bytearray(len(chunk)))
    with pytest.raises(EntryError, match="bits"):
        KVCodec(layout, 32, bits=3).decode_into(encoded, out)
    with pytest.raises(EntryError, match="shape"):
        KVCodec(KVLayout("packed_nhd", 2, 1, 16, 16, "bfloat16"), 32).decode_into(encoded, out)
    with pytest.raises(EntryError, match="stream"):
        KVCodec(layout, 32).decode_into(encoded + b"\0\0\0\0", out)


# ---- entry framing with a codec -------------------------------------------------------------------

LAYOUT = KVLayout("packed_nhd", 2, 2, 16, 16, "bfloat16")
CODEC = KVCodec(LAYOUT, 32)
CHUNK = chunk_of(LAYOUT, 32, kv_like(np.random.default_rng(4), 2, 32, 32, 1.0))
FINGERPRINT = LAYOUT.fingerprint()


@pytest.mark.parametrize("sealer", [None, SEALER], ids=["clear", "sealed"])
def test_framed_compressed_entry_round_trips_and_needs_a_codec(sealer: Sealer | None) -> None:
    header, stored = frame(KEY, 0, FINGERPRINT, memoryview(CHUNK), sealer, NAMESPACE, CODEC)
    assert decode_header(header).codec == CODEC_CACHEGEN | (CODEC_AES256_GCM if sealer else CODEC_RAW)
    assert stored.nbytes < len(CHUNK)
    out = bytearray(len(CHUNK))
    unframe_into(header, memoryview(bytes(stored)), KEY, 0, FINGERPRINT, memoryview(out), sealer, NAMESPACE, CODEC)
    expected = bytearray(len(CHUNK))
    CODEC.decode_into(CODEC.encode(memoryview(CHUNK)) or b"", memoryview(expected))
    assert out == expected  # deterministic: what was encoded is what decodes
    with pytest.raises(EntryError, match="compression is off"):
        unframe_into(header, memoryview(bytes(stored)), KEY, 0, FINGERPRINT, memoryview(out), sealer, NAMESPACE, None)


@pytest.mark.parametrize("sealer", [None, SEALER], ids=["clear", "sealed"])
def test_a_reader_with_a_codec_reads_uncompressed_entries_exactly(sealer: Sealer | None) -> None:
    header, stored = frame(KEY, 0, FINGERPRINT, memoryview(CHUNK), sealer, NAMESPACE, None)
    out = bytearray(len(CHUNK))
    unframe_into(header, memoryview(bytes(stored)), KEY, 0, FINGERPRINT, memoryview(out), sealer, NAMESPACE, CODEC)
    assert out == CHUNK


def test_a_sealed_entry_relabelled_as_uncompressed_does_not_open() -> None:
    header, stored = frame(KEY, 0, FINGERPRINT, memoryview(CHUNK), SEALER, NAMESPACE, CODEC)
    decoded = decode_header(header)
    relabelled = encode_header(type(decoded)(decoded.key, decoded.rank, decoded.layout_fingerprint,
                                             CODEC_AES256_GCM, decoded.payload_bytes, decoded.payload_checksum))
    with pytest.raises(EntryError, match="authenticate"):
        unframe_into(relabelled, memoryview(bytes(stored)), KEY, 0, FINGERPRINT, memoryview(bytearray(len(CHUNK))),
                     SEALER, NAMESPACE, CODEC)
