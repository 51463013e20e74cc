"""int8 slots (``memory.kv_format: int8``): the codec's error bound, and ChunkMover storing and
loading quantised chunks through the direct CPU path, the staged path on CPU tensors, and (where a
GPU is present: benchmarks/gpu_checks.sh) the staged path on CUDA.

The test reads the slots with its own slicing of the documented format (kvtier.slotcodec), so a
codec that wrote another layout than the one documented fails here.
"""

from __future__ import annotations

import pytest
import torch
import xxhash

from kv_engines import BACKEND, engine_layers, layout_of, pages
from kvtier.compression import KVCodec
from kvtier.datapath import ChunkMover, HostPool, PagedKV
from kvtier.errors import LayoutError
from kvtier.layout import INT8_GROUP_ELEMS, KNOWN_KINDS, KVLayout
from kvtier.plans import LoadOp, StoreOp
from kvtier.slotcodec import Int8SlotCodec

NUM_BLOCKS = 24
PER = 4  # blocks per chunk
PATHS = [("cpu", False), ("cpu", True)] + ([("cuda", True)] if torch.cuda.is_available() else [])
HALF_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # relative rounding of a value to the dtype


def read_slot(pool: HostPool, slot: int, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot as the docs describe it: int8 [layers, blocks, page], then float32 scales
    [layers, blocks, page / group]."""
    data = pool.slot(slot).cpu()
    page = layout.block_elems_per_layer
    num_values = layout.num_layers * PER * page
    values = data[:num_values].view(torch.int8).view(layout.num_layers, PER, page)
    scales = data[num_values:num_values + num_values // INT8_GROUP_ELEMS * 4].view(torch.float32)
    return values, scales.view(layout.num_layers, PER, page // INT8_GROUP_ELEMS)


def as_float(words: torch.Tensor, dtype: str) -> torch.Tensor:
    """Pages of KV-sized words as float32 values."""
    return words.cpu().view(getattr(torch, dtype)).float()


def check_slot(pool: HostPool, slot: int, layout: KVLayout, originals: list[torch.Tensor]) -> None:
    """The slot holds ``originals`` (per layer, [blocks, page] words) quantised: scale = max|x|/127
    per group, and every value decodes within scale/2 of the original."""
    values, scales = read_slot(pool, slot, layout)
    for layer, words in enumerate(originals):
        x = as_float(words, layout.dtype).unflatten(-1, (-1, INT8_GROUP_ELEMS))
        scale = scales[layer]
        assert torch.allclose(scale, x.abs().amax(dim=-1) / 127, rtol=1e-6, atol=0)
        decoded = values[layer].float().unflatten(-1, (-1, INT8_GROUP_ELEMS)) * scale.unsqueeze(-1)
        assert ((decoded - x).abs() <= scale.unsqueeze(-1) * (0.5 + 1e-5)).all()


def check_loaded(pool: HostPool, slot: int, layout: KVLayout, first_block: int, loaded: list[torch.Tensor]) -> None:
    """``loaded`` (per layer, [blocks, page] words of the engine) is the slot's blocks
    ``first_block..`` dequantised in float32 and rounded once to the dtype: bit for bit."""
    values, scales = read_slot(pool, slot, layout)
    dtype = getattr(torch, layout.dtype)
    for layer, words in enumerate(loaded):
        count = words.shape[0]
        q = values[layer, first_block:first_block + count].float().unflatten(-1, (-1, INT8_GROUP_ELEMS))
        expected = (q * scales[layer, first_block:first_block + count].unsqueeze(-1)).flatten(-2).to(dtype)
        assert torch.equal(words.cpu().view(dtype), expected)


def mover_of(layout: KVLayout, layers: list[torch.Tensor], device: str, staged: bool, group_chunks: int,
             num_slots: int = 5) -> tuple[ChunkMover, HostPool]:
    paged = PagedKV(layers, layout, BACKEND[layout.kind])
    pool = HostPool(num_slots, layout.chunk_bytes(PER * layout.block_size), pin_memory=device == "cuda")
    stage_bytes = pool.slot_bytes + PER * layout.block_bytes_per_layer * layout.num_layers
    mover = ChunkMover(paged, pool, blocks_per_chunk=PER, num_staging=2, group_bytes=group_chunks * stage_bytes,
                       staged=staged)
    assert mover.group_chunks == group_chunks
    return mover, pool


# ---- the codec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_codec_round_trip_within_half_a_step_per_group(dtype: str) -> None:
    layout = KVLayout("packed_hnd", 2, 2, 64, 16, dtype, "int8")
    codec = Int8SlotCodec(layout, PER)
    gen = torch.Generator().manual_seed(1)
    # groups of very different magnitudes, one group of zeros, one of a constant
    src = (torch.randn(3, 2, PER, layout.block_elems_per_layer, generator=gen)
           * torch.logspace(-3, 2, layout.block_elems_per_layer)).to(getattr(torch, dtype))
    src[0, 0, 0, :INT8_GROUP_ELEMS] = 0
    src[0, 0, 1, :INT8_GROUP_ELEMS] = 0.75
    slots = torch.zeros(3, codec.slot_bytes, dtype=torch.uint8)
    values, scales = codec.split(slots)
    codec.encode(src, values, scales)
    out = torch.empty_like(src)
    codec.decode(values, scales, out)
    step = scales.unsqueeze(-1)
    error = (out.float() - src.float()).unflatten(-1, (-1, INT8_GROUP_ELEMS)).abs()
    bound = step * (0.5 + 1e-5) + out.float().abs().unflatten(-1, (-1, INT8_GROUP_ELEMS)) * HALF_ULP[dtype]
    assert (error <= bound).all()
    assert scales[0, 0, 0, 0] == 0 and not out[0, 0, 0, :INT8_GROUP_ELEMS].any()  # zeros stay zeros
    assert torch.equal(out[0, 0, 1, :INT8_GROUP_ELEMS], src[0, 0, 1, :INT8_GROUP_ELEMS])  # +-127 steps: exact
    assert values.abs().max() == 127
    assert codec.slot_bytes == layout.chunk_bytes(PER * 16) < layout.raw_chunk_bytes(PER * 16) * 0.54


# ---- the mover --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("device", "staged"), PATHS)
@pytest.mark.parametrize("group_chunks", [1, 2, 3])
@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_store_then_load_quantised_chunks(kind: str, device: str, staged: bool, group_chunks: int) -> None:
    layout = layout_of(kind, 3, 2, 32, 16, "bfloat16")
    layout = KVLayout(layout.kind, layout.num_layers, layout.num_kv_heads, layout.head_size, layout.block_size,
                      layout.dtype, "int8")
    layers = engine_layers(layout, NUM_BLOCKS, device)
    mover, pool = mover_of(layout, layers, device, staged, group_chunks)
    chunks = [[7, 2, 9, 4], [11, 0, 5, 3], [1, 8, 6, 10]]
    originals = [pages(layers, kind, ids) for ids in chunks]
    # three chunks into non-adjacent slots, in groups of 1, 2 or 3 over 2 staging buffers
    mover.gather_chunks([StoreOp(b"", slot, tuple(ids)) for slot, ids in zip([4, 0, 2], chunks)])
    mover.wait()
    for slot, original in zip([4, 0, 2], originals):
        check_slot(pool, slot, layout, original)
    # a partial hit (the last three blocks of chunk 1) and a whole chunk, into fresh blocks
    mover.scatter_chunks([LoadOp(0, 1, (12, 13, 14)), LoadOp(2, 0, (20, 17, 23, 15))])
    mover.wait_loads()
    check_loaded(pool, 0, layout, 1, pages(layers, kind, [12, 13, 14]))
    check_loaded(pool, 2, layout, 0, pages(layers, kind, [20, 17, 23, 15]))
    # whole chunks only (one index_put_ per layer), then adjacent slots both ways (one copy per run)
    mover.scatter_chunks([LoadOp(4, 0, (16, 18, 19, 21)), LoadOp(0, 0, (22, 12, 13, 14))])
    mover.wait()
    check_loaded(pool, 4, layout, 0, pages(layers, kind, [16, 18, 19, 21]))
    check_loaded(pool, 0, layout, 0, pages(layers, kind, [22, 12, 13, 14]))
    sources = [[16, 18, 19, 21], [22, 12, 13, 14], [20, 17, 23, 15]]
    expected = [pages(layers, kind, ids) for ids in sources]
    mover.gather_chunks([StoreOp(b"", slot, tuple(ids)) for slot, ids in zip([1, 2, 3], sources)])
    mover.wait()
    for slot, original in zip([1, 2, 3], expected):
        check_slot(pool, slot, layout, original)
    targets = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    mover.scatter_chunks([LoadOp(slot, 0, tuple(ids)) for slot, ids in zip([1, 2, 3], targets)])
    mover.wait()
    for slot, ids in zip([1, 2, 3], targets):
        check_loaded(pool, slot, layout, 0, pages(layers, kind, ids))


@pytest.mark.parametrize(("device", "staged"), PATHS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paths_write_the_same_slots_and_keep_zeros(dtype: str, device: str, staged: bool) -> None:
    layout = KVLayout("packed_nhd", 2, 2, 64, 16, dtype, "int8")
    layers = engine_layers(layout, NUM_BLOCKS, device, seed=3)
    for tensor in layers:
        tensor[5].zero_()  # a block of zeros
    mover, pool = mover_of(layout, layers, device, staged, group_chunks=2)
    reference, reference_pool = mover_of(layout, [t.cpu() for t in layers], "cpu", False, group_chunks=1)
    ops = [StoreOp(b"", 1, (5, 1, 2, 3)), StoreOp(b"", 0, (9, 8, 7, 6))]
    mover.gather_chunks(ops)
    mover.wait()
    reference.gather_chunks(ops)
    if device == "cpu":
        assert torch.equal(pool.data[:2].cpu(), reference_pool.data[:2])  # every CPU path quantises alike
    else:  # the GPU's division may round a value that lies on a .5 level the other way: one level at most
        for slot in (0, 1):
            ours, theirs = read_slot(pool, slot, layout), read_slot(reference_pool, slot, layout)
            assert torch.allclose(ours[1], theirs[1], rtol=1e-6, atol=0)
            steps = (ours[0].int() - theirs[0].int()).abs()
            assert steps.max() <= 1 and steps.float().mean() < 1e-3
    values, scales = read_slot(pool, 1, layout)
    assert not values[:, 0].any() and not scales[:, 0].any()
    mover.scatter_chunks([LoadOp(1, 0, (20, 21, 22, 23))])
    mover.wait()
    for tensor in layers:
        assert not tensor[20].any()  # zeros come back as zeros
    check_loaded(pool, 1, layout, 0, pages(layers, "packed_nhd", [20, 21, 22, 23]))


# ---- sizes, identity, refusals ----------------------------------------------------------------------

def test_int8_slots_are_about_half_and_never_meet_exact_entries() -> None:
    exact = KVLayout("packed_nhd", 32, 8, 128, 16, "bfloat16")  # Llama-3.1-8B
    int8 = KVLayout("packed_nhd", 32, 8, 128, 16, "bfloat16", "int8")
    # int8 values plus one float32 scale per 64 elements, against 2 bytes an element
    page = 2 * 8 * 16 * 128  # elements of one block of one layer; 16 blocks a chunk
    assert int8.chunk_bytes(256) == 32 * 16 * (page + page // 64 * 4) == 17_825_792
    assert exact.chunk_bytes(256) == int8.raw_chunk_bytes(256) == 32 * 16 * page * 2 == 33_554_432
    assert int8.bytes_per_token == exact.bytes_per_token
    assert int8.fingerprint() != exact.fingerprint()
    # the exact fingerprint is the one it was before slot formats existed
    assert exact.fingerprint() == xxhash.xxh3_128_digest(b"packed_nhd|32|8|128|16|bfloat16")


def test_int8_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(LayoutError, match="float8_e4m3fn.*memory.kv_format: exact"):
        KVLayout("packed_nhd", 2, 8, 128, 16, "float8_e4m3fn", "int8")
    with pytest.raises(LayoutError, match="multiple of 64 elements"):
        KVLayout("packed_nhd", 2, 1, 8, 2, "bfloat16", "int8")  # pages of 32 elements
    with pytest.raises(LayoutError, match="unknown KV slot format 'int4'"):
        KVLayout("packed_nhd", 2, 8, 128, 16, "bfloat16", "int4")
    with pytest.raises(LayoutError, match="exact slots"):
        KVCodec(KVLayout("packed_nhd", 2, 8, 128, 16, "bfloat16", "int8"), 256)
    layout = KVLayout("packed_nhd", 1, 2, 32, 16, "bfloat16", "int8")
    paged = PagedKV(engine_layers(layout, NUM_BLOCKS), layout, "FLASH_ATTN")
    exact_bytes = layout.raw_chunk_bytes(16)
    with pytest.raises(LayoutError, match="cannot hold a chunk"):
        ChunkMover(paged, HostPool(1, layout.chunk_bytes(16) - 1, pin_memory=False), blocks_per_chunk=1)
    ChunkMover(paged, HostPool(1, exact_bytes, pin_memory=False), blocks_per_chunk=1)  # larger slots do
