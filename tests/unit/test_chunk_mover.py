"""ChunkMover: a step's store and load ops in one batch each, bit-exact for both layouts.

On CPU the mover copies straight between blocks and slots; on CUDA (run where a GPU is present)
the same ops go through the staging ring and its streams.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.datapath import ChunkMover, HostPool, PagedKV
from kvtier.layout import KVLayout
from kvtier.plans import LoadOp, StoreOp

NUM_BLOCKS = 24
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def engine_layers(layout: KVLayout, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    heads, block, head = layout.num_kv_heads, layout.block_size, layout.head_size
    shape = (NUM_BLOCKS, heads, block, 2 * head) if layout.kind == "cpu_lbhnc" else (2, NUM_BLOCKS, block, heads, head)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16).to(device) for _ in range(layout.num_layers)]


def blocks(layers: list[torch.Tensor], kind: str, ids: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(ids, device=layers[0].device)
    return [t.view(torch.int16).index_select(0 if kind == "cpu_lbhnc" else 1, index) for t in layers]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["cpu_lbhnc", "cuda_flash"])
def test_batched_store_then_load_moves_every_chunk_bit_exact(kind: str, device: str) -> None:
    layout = KVLayout(kind, 3, 2, 8, 16, "bfloat16")
    layers = engine_layers(layout, device)
    paged = PagedKV(layers, layout)
    pool = HostPool(5, layout.chunk_bytes(64), pin_memory=device == "cuda")
    mover = ChunkMover(paged, pool, blocks_per_chunk=4, num_staging=2)  # 3 chunks cycle 2 buffers
    chunks = [[7, 2, 9, 4], [11, 0, 5, 3], [1, 8, 6, 10]]
    mover.gather_chunks([StoreOp(b"", slot, tuple(ids)) for slot, ids in zip([4, 0, 2], chunks)])
    mover.wait()
    # load chunks 1 and 2 into fresh blocks; of chunk 1 only its last three blocks (a partial hit)
    mover.scatter_chunks([LoadOp(0, 1, (12, 13, 14)), LoadOp(2, 0, (20, 17, 23, 15))])
    mover.wait()
    for src, dst in (([0, 5, 3], [12, 13, 14]), (chunks[2], [20, 17, 23, 15])):
        for a, b in zip(blocks(layers, kind, src), blocks(layers, kind, dst)):
            assert torch.equal(a, b)
    stored = paged.slot_view(pool.slot(4), 4)
    expected = blocks(layers, kind, chunks[0])
    for layer in range(layout.num_layers):
        assert torch.equal(stored[layer], expected[layer].cpu().reshape(stored[layer].shape))


def test_empty_batches_do_nothing() -> None:
    layout = KVLayout("cuda_flash", 1, 2, 8, 16, "bfloat16")
    paged = PagedKV(engine_layers(layout, "cpu"), layout)
    mover = ChunkMover(paged, HostPool(1, layout.chunk_bytes(16), pin_memory=False), blocks_per_chunk=1)
    mover.gather_chunks([])
    mover.scatter_chunks([])
    mover.wait()
