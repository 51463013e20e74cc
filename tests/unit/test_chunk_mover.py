"""ChunkMover: a step's store and load ops in one batch each, bit-exact for every layout.

On CPU the mover copies straight between blocks and slots; on CUDA (run where a GPU is present)
the same ops go through the staging ring and its streams.
"""

from __future__ import annotations

import pytest
import torch

from kv_engines import BACKEND, engine_layers, layout_of, pages
from kvtier.datapath import ChunkMover, HostPool, PagedKV
from kvtier.layout import KNOWN_KINDS, KVLayout
from kvtier.plans import LoadOp, StoreOp

NUM_BLOCKS = 24
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# (device, staged): the CPU runs the staged path too, so its grouping is checked without a GPU
PATHS = [("cpu", False), ("cpu", True)] + ([("cuda", True)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(("device", "staged"), PATHS)
@pytest.mark.parametrize("group_chunks", [1, 2, 3])
@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_batched_store_then_load_moves_every_chunk_bit_exact(kind: str, device: str, staged: bool,
                                                             group_chunks: int) -> None:
    layout = layout_of(kind, 3, 2, 8, 16, "bfloat16")
    layers = engine_layers(layout, NUM_BLOCKS, device)
    paged = PagedKV(layers, layout, BACKEND[kind])
    pool = HostPool(5, layout.chunk_bytes(64), pin_memory=device == "cuda")
    # 3 chunks in groups of 1, 2 or 3 cycle 2 staging buffers
    mover = ChunkMover(paged, pool, blocks_per_chunk=4, num_staging=2, group_bytes=group_chunks * pool.slot_bytes,
                       staged=staged)
    chunks = [[7, 2, 9, 4], [11, 0, 5, 3], [1, 8, 6, 10]]
    mover.gather_chunks([StoreOp(b"", slot, tuple(ids)) for slot, ids in zip([4, 0, 2], chunks)])
    mover.wait()
    # load chunks 1 and 2 into fresh blocks; of chunk 1 only its last three blocks (a partial hit)
    mover.scatter_chunks([LoadOp(0, 1, (12, 13, 14)), LoadOp(2, 0, (20, 17, 23, 15))])
    mover.wait_loads()
    for src, dst in (([0, 5, 3], [12, 13, 14]), (chunks[2], [20, 17, 23, 15])):
        for a, b in zip(pages(layers, kind, src), pages(layers, kind, dst)):
            assert torch.equal(a, b)
    # whole chunks only: the one-kernel-per-layer path
    mover.scatter_chunks([LoadOp(4, 0, (16, 18, 19, 21)), LoadOp(0, 0, (22, 12, 13, 14))])
    mover.wait()
    for src, dst in ((chunks[0], [16, 18, 19, 21]), (chunks[1], [22, 12, 13, 14])):
        for a, b in zip(pages(layers, kind, src), pages(layers, kind, dst)):
            assert torch.equal(a, b)
    stored = paged.slot_view(pool.slot(4), 4)
    for layer, expected in enumerate(pages(layers, kind, chunks[0])):
        assert torch.equal(stored[layer], expected.cpu())
    # adjacent slots: one copy per run of slots, in both directions
    sources = [[16, 18, 19, 21], [22, 12, 13, 14], [20, 17, 23, 15]]
    expected = [pages(layers, kind, ids) for ids in sources]
    mover.gather_chunks([StoreOp(b"", slot, tuple(ids)) for slot, ids in zip([1, 2, 3], sources)])
    mover.wait()
    targets = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    mover.scatter_chunks([LoadOp(slot, 0, tuple(ids)) for slot, ids in zip([1, 2, 3], targets)])
    mover.wait()
    for want, ids in zip(expected, targets):
        for a, b in zip(want, pages(layers, kind, ids)):
            assert torch.equal(a, b)


def test_empty_batches_do_nothing() -> None:
    layout = KVLayout("packed_nhd", 1, 2, 8, 16, "bfloat16")
    paged = PagedKV(engine_layers(layout, NUM_BLOCKS), layout, "FLASH_ATTN")
    mover = ChunkMover(paged, HostPool(1, layout.chunk_bytes(16), pin_memory=False), blocks_per_chunk=1)
    mover.gather_chunks([])
    mover.scatter_chunks([])
    mover.wait()
