"""LayeredLoads: memory loads queued layer group by layer group, bit-exact for every layout.

On CPU the staging ring runs both stages at once, so the copies and their grouping are checked
without a GPU; on CUDA (where present) the per-group events order the engine's stream, and a
forward that waits for one layer group only must see exactly that group's layers.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kv_engines import BACKEND, engine_layers, layout_of, pages
from kvtier.datapath import ChunkMover, HostPool, PagedKV
from kvtier.integrations.vllm.compat import layer_hooks_run
from kvtier.layerload import LayeredLoads, layer_groups, partitions
from kvtier.layout import KNOWN_KINDS
from kvtier.plans import LoadOp, StoreOp
from kvtier.staging import StagingRing

NUM_BLOCKS = 24
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@given(st.integers(1, 200), st.integers(1, 80))
def test_layer_groups_cover_every_layer_once_in_order(num_layers: int, num_groups: int) -> None:
    groups = layer_groups(num_layers, num_groups)
    assert [layer for group in groups for layer in group] == list(range(num_layers))
    assert len(groups) == min(num_layers, num_groups)
    sizes = {len(group) for group in groups}
    assert max(sizes) - min(sizes) <= 1


@given(st.integers(0, 300), st.integers(1, 50))
def test_partitions_cover_every_chunk_once_within_the_fill(num_chunks: int, per_fill: int) -> None:
    fills = partitions(num_chunks, per_fill)
    assert [i for fill in fills for i in fill] == list(range(num_chunks))
    assert all(1 <= len(fill) <= per_fill for fill in fills)


def test_bad_group_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        layer_groups(0, 4)
    with pytest.raises(ValueError):
        partitions(3, 0)


def _setup(kind: str, device: str, num_layers: int, fill_chunks: int, num_groups: int):
    layout = layout_of(kind, num_layers, 2, 8, 16, "bfloat16")
    layers = engine_layers(layout, NUM_BLOCKS, device)
    paged = PagedKV(layers, layout, BACKEND[kind])
    pool = HostPool(5, layout.chunk_bytes(64), pin_memory=device == "cuda")
    mover = ChunkMover(paged, pool, blocks_per_chunk=4, staged=True)
    group_bytes = max(len(g) for g in layer_groups(num_layers, num_groups)) * 4 * layout.block_bytes_per_layer
    ring = StagingRing(paged.device, fill_chunks * group_bytes, 2)
    return layout, layers, pool, mover, LayeredLoads(paged, pool, ring, 4, num_groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("num_layers", "num_groups", "fill_chunks"), [(3, 2, 1), (5, 3, 2), (4, 1, 3), (2, 8, 1)])
@pytest.mark.parametrize("kind", KNOWN_KINDS)
def test_layered_load_equals_the_stored_blocks(kind: str, device: str, num_layers: int, num_groups: int,
                                               fill_chunks: int) -> None:
    """Whole and partial chunks, several fills per layer group, groups of unequal size: every
    loaded block equals the block that was stored, in every layer."""
    _, layers, _, mover, layered = _setup(kind, device, num_layers, fill_chunks, num_groups)
    chunks = [[7, 2, 9, 4], [11, 0, 5, 3], [1, 8, 6, 10]]
    mover.gather_chunks([StoreOp(b"", slot, tuple(ids)) for slot, ids in zip([4, 0, 2], chunks)])
    mover.wait()
    loads = [LoadOp(0, 1, (12, 13, 14)), LoadOp(2, 0, (20, 17, 23, 15)), LoadOp(4, 0, (16, 18, 19, 21))]
    layered.scatter(loads)
    assert layered.pending
    layered.fence_all()
    assert not layered.pending
    layered.wait()
    for src, dst in (([0, 5, 3], [12, 13, 14]), (chunks[2], [20, 17, 23, 15]), (chunks[0], [16, 18, 19, 21])):
        for a, b in zip(pages(layers, kind, src), pages(layers, kind, dst)):
            assert torch.equal(a, b)


def test_int8_slots_are_refused() -> None:
    layout = layout_of("packed_nhd", 2, 2, 32, 16, "bfloat16")
    int8 = replace(layout, kv_format="int8")
    paged = PagedKV(engine_layers(int8, NUM_BLOCKS), int8, BACKEND["packed_nhd"])
    pool = HostPool(2, int8.chunk_bytes(64), pin_memory=False)
    with pytest.raises(ValueError, match="exact slots"):
        LayeredLoads(paged, pool, StagingRing(paged.device, 1 << 20, 2), 4, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the per-group events order CUDA streams")
def test_a_forward_waiting_for_the_first_group_sees_its_layers() -> None:
    """After ``wait_layer(0)`` only, a kernel on the engine's stream reads the first group's
    layers as loaded; after ``fence_all`` every layer."""
    layout, layers, pool, mover, layered = _setup("packed_nhd", "cuda", 8, 1, 4)
    src = list(range(4))
    mover.gather_chunks([StoreOp(b"", 1, tuple(src))])
    mover.wait()
    for layer in layers:
        layer[16:20].zero_()
    layered.scatter([LoadOp(1, 0, (16, 17, 18, 19))])
    layered.wait_layer(0)  # group 0: layers 0 and 1
    seen = pages(layers[:2], "packed_nhd", [16, 17, 18, 19])  # queued after group 0's event
    layered.fence_all()
    torch.cuda.synchronize()
    want = pages(layers, "packed_nhd", src)
    assert torch.equal(seen[0], want[0]) and torch.equal(seen[1], want[1])
    assert all(torch.equal(a, b) for a, b in zip(pages(layers, "packed_nhd", [16, 17, 18, 19]), want))


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.mark.parametrize(("mode", "metadata", "expected"), [
    ("PIECEWISE", {"a": 1, "b": 2}, True),
    ("NONE", {"a": 1, "b": 2}, True),
    ("FULL", {"a": 1, "b": 2}, False),  # a FULL CUDA-graph replay skips the hooks
    ("PIECEWISE", {"a": 1}, False),  # a layer without metadata: its hook is skipped
    ("PIECEWISE", {"a": 1, "b": None}, False),
    ("PIECEWISE", None, False),  # a dummy run
    ("PIECEWISE", [{"a": 1, "b": 2}], False),  # micro-batches: not followed
])
def test_layer_hooks_run_only_where_vllm_calls_them(mode: str, metadata: object, expected: bool) -> None:
    context = SimpleNamespace(cudagraph_runtime_mode=_Mode(mode), attn_metadata=metadata)
    assert layer_hooks_run(context, ["a", "b"]) is expected


def test_a_context_without_the_mode_is_not_pipelined() -> None:
    assert layer_hooks_run(SimpleNamespace(attn_metadata={"a": 1}), ["a"]) is False
