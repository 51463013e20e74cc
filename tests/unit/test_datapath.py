"""Block moves between a paged KV cache and host slots: exact, for every known layout."""

from __future__ import annotations

import pytest
import torch

from kv_engines import BACKEND, engine_layers, layout_of, pages
from kvtier.datapath import HostPool, PagedKV
from kvtier.errors import LayoutError
from kvtier.layout import KNOWN_KINDS, KVLayout

NUM_BLOCKS = 12


@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_store_then_load_into_other_blocks_is_bit_exact(kind: str) -> None:
    layout = layout_of(kind, 3, 2, 8, 16, "bfloat16")
    layers = engine_layers(layout, NUM_BLOCKS)
    paged = PagedKV(layers, layout, BACKEND[kind])
    pool = HostPool(2, layout.chunk_bytes(64), pin_memory=False)
    src_blocks, dst_blocks = [7, 2, 9, 4], [0, 1, 10, 11]
    paged.gather(src_blocks, paged.slot_view(pool.slot(1), 4))
    stored = paged.slot_view(pool.slot(1), 4)
    for layer, expected in enumerate(pages(layers, kind, src_blocks)):  # the slot holds the engine's own bytes
        assert torch.equal(stored[layer], expected)
    # load only the last three blocks of the chunk (a partial hit after the engine's own prefix)
    paged.scatter(stored, 1, dst_blocks[1:])
    for a, b in zip(pages(layers, kind, src_blocks[1:]), pages(layers, kind, dst_blocks[1:])):
        assert torch.equal(a, b)
    assert not torch.equal(pages(layers, kind, [0])[0], pages(layers, kind, [src_blocks[0]])[0])


def test_wrong_shape_is_refused_with_backend_and_shape() -> None:
    layout = KVLayout("cpu_lbhnc", 1, 2, 8, 16, "bfloat16")
    with pytest.raises(LayoutError, match=r"'CPU_ATTN'.*\(12, 16, 2, 16\)"):
        PagedKV([torch.zeros(NUM_BLOCKS, 16, 2, 16)], layout, "CPU_ATTN")


def test_layout_mismatch_is_refused() -> None:
    nhd = KVLayout("packed_nhd", 2, 2, 8, 16, "bfloat16")
    with pytest.raises(LayoutError, match="expected KV layout packed_hnd.*FLASH_ATTN backend uses packed_nhd"):
        PagedKV(engine_layers(nhd, NUM_BLOCKS), KVLayout("packed_hnd", 2, 2, 8, 16, "bfloat16"), "FLASH_ATTN")
    with pytest.raises(LayoutError, match="3 KV layers"):
        PagedKV(engine_layers(nhd, NUM_BLOCKS), KVLayout("packed_nhd", 3, 2, 8, 16, "bfloat16"), "FLASH_ATTN")
    with pytest.raises(LayoutError, match="dtype"):
        PagedKV(engine_layers(nhd, NUM_BLOCKS), KVLayout("packed_nhd", 2, 2, 8, 16, "float16"), "FLASH_ATTN")


def test_layers_sharing_one_buffer_with_the_layer_inside_the_block() -> None:
    # vLLM 0.32+'s BL* layouts: one allocation [blocks, layers, page]; each layer's view skips the
    # other layers' pages
    layout = KVLayout("packed_hnd", 2, 2, 8, 16, "bfloat16")
    buffer = torch.randn(NUM_BLOCKS, 2, 2, 16, 16).to(torch.bfloat16)
    layers = [buffer[:, layer] for layer in range(2)]
    paged = PagedKV(layers, layout, "FLASH_ATTN")
    pool = HostPool(1, layout.chunk_bytes(32), pin_memory=False)
    paged.gather([3, 5], paged.slot_view(pool.slot(0), 2))
    paged.scatter(paged.slot_view(pool.slot(0), 2), 0, [8, 1])
    for layer in layers:
        assert torch.equal(layer[[8, 1]], layer[[3, 5]])
    assert not torch.equal(layers[0][3], layers[1][3])


def test_slots_are_cut_into_runs_of_adjacent_slots() -> None:
    from kvtier.staged_copies import _runs

    assert _runs([4, 5, 6, 1, 2, 9]) == [(0, 4, 3), (3, 1, 2), (5, 9, 1)]
    assert _runs([3, 2]) == [(0, 3, 1), (1, 2, 1)]
    assert _runs([]) == []
