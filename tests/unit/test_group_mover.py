"""Several KV cache groups on the worker (CPU tensors laid out as vLLM-CPU's): ``GroupedMover`` moves
each group's block runs between the engine's blocks and a slot, and a multi-group load that fails
part-way fails the whole request (reported by request, never by block); the start-up refusals."""

from __future__ import annotations

import time

import pytest
import torch

from kvtier.config import load_config
from kvtier.datapath import HostPool, PagedKV
from kvtier.errors import ConfigError, LayoutError
from kvtier.groupmover import GroupedMover
from kvtier.integrations.vllm.setup import EngineSetup, _layout_of
from kvtier.integrations.vllm.worker import WorkerSide
from kvtier.keys import Namespace
from kvtier.kvgroups import GroupPlan, KVGroup
from kvtier.layout import KVLayout
from kvtier.plans import AsyncLoad, BlockRun, LoadOp, SlotOp, StepPlan, StoreOp
from tests.dict_tier import DictTier

BLOCK = 16
GROUP_LAYOUT = KVLayout("cpu_lbhnc", 2, 1, 8, BLOCK, "bfloat16")  # one group: two layers
NUM_BLOCKS = 12


def caches(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(NUM_BLOCKS, 1, BLOCK, 16, generator=gen).to(torch.bfloat16)
            for name in ("s0", "s1", "f0", "f1")}


def mover(tensors: dict[str, torch.Tensor], pool: HostPool) -> GroupedMover:
    groups = [PagedKV([tensors["s0"], tensors["s1"]], GROUP_LAYOUT, "CPU_ATTN"),
              PagedKV([tensors["f0"], tensors["f1"]], GROUP_LAYOUT, "CPU_ATTN")]
    return GroupedMover(groups, pool, blocks_per_chunk=2)


def test_runs_move_only_their_blocks_group_by_group() -> None:
    pool = HostPool(2, 2 * GROUP_LAYOUT.chunk_bytes(2 * BLOCK), pin_memory=False)
    source, target = caches(0), {name: torch.zeros(NUM_BLOCKS, 1, BLOCK, 16, dtype=torch.bfloat16)
                                 for name in ("s0", "s1", "f0", "f1")}
    # the window group keeps block 1 of the chunk (engine block 5), full attention both (3, 4)
    mover(source, pool).gather_chunks([StoreOp(b"k", 1, (3, 4), "r", (BlockRun(1, (5,)), BlockRun(0, (3, 4))))])
    mover(target, pool).scatter_chunks([LoadOp(1, 0, (7, 8), (BlockRun(1, (9,)), BlockRun(0, (7, 8))))])
    for name in ("f0", "f1"):
        assert torch.equal(target[name][7], source[name][3]) and torch.equal(target[name][8], source[name][4])
    for name in ("s0", "s1"):
        assert torch.equal(target[name][9], source[name][5])
        assert not target[name][[i for i in range(NUM_BLOCKS) if i != 9]].any()  # nothing else written


def test_a_stored_slot_holds_nothing_of_its_previous_chunk() -> None:
    """A window group writes only its window's blocks; the rest of the slot kept its previous
    occupant (perhaps another tenant's KV), and the whole slot goes to disk, the remote and peers
    under the new chunk's key (review finding)."""
    pool = HostPool(1, 2 * GROUP_LAYOUT.chunk_bytes(2 * BLOCK) + 64, pin_memory=False)
    pool.slot(0).fill_(0x5A)  # the previous chunk
    source = caches(1)
    mover(source, pool).gather_chunks([StoreOp(b"k", 0, (3, 4), "r", (BlockRun(1, (5,)), BlockRun(0, (3, 4))))])
    window = mover(source, pool)._group_view(0, 0)
    assert not window[:, 0].any()  # outside the window: zeros, not the previous chunk
    assert pool.slot(0)[-64:].eq(0).all()  # the slot's tail
    target = {name: torch.zeros(NUM_BLOCKS, 1, BLOCK, 16, dtype=torch.bfloat16) for name in ("s0", "s1", "f0", "f1")}
    mover(target, pool).scatter_chunks([LoadOp(0, 0, (7, 8), (BlockRun(1, (9,)), BlockRun(0, (7, 8))))])
    assert torch.equal(target["s0"][9], source["s0"][5]) and torch.equal(target["f1"][8], source["f1"][4])


def hybrid_worker(remote: DictTier) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    plan = GroupPlan((KVGroup(("s0", "s1"), 20), KVGroup(("f0", "f1"))), BLOCK, 2)
    layout = KVLayout("cpu_lbhnc", 4, 1, 8, BLOCK, "bfloat16", groups=plan.describe())
    config = load_config({"chunk_tokens": 2 * BLOCK}, {}).config
    setup = EngineSetup(config, layout, Namespace("default", "m", layout.fingerprint(), 1), plan.layer_names, 1,
                        layout.chunk_bytes(2 * BLOCK), 4, None, 0, groups=plan)
    side = WorkerSide(setup, 0, remote, None)
    tensors = {name: torch.zeros(NUM_BLOCKS, 1, BLOCK, 16, dtype=torch.bfloat16) for name in plan.layer_names}
    side.register_kv_caches(tensors, "CPU_ATTN")
    return side, tensors


def test_a_multi_group_load_that_fails_part_way_fails_the_whole_request() -> None:
    remote = DictTier()
    side, tensors = hybrid_worker(remote)
    fingerprint = side.setup.layout.fingerprint()
    keys = [bytes([i]) * 16 for i in range(2)]
    remote.put(keys[0], 0, b"\x01" * side.setup.chunk_bytes, fingerprint, namespace="default")  # keys[1] missing
    loads = tuple(LoadOp(slot, 0, (2 * slot + 1, 2 * slot + 2),
                         (BlockRun(1, (2 * slot + 6,)), BlockRun(0, (2 * slot + 1, 2 * slot + 2)))) for slot in (0, 1))
    fills = tuple(SlotOp(key, slot, "default") for slot, key in enumerate(keys))
    side.start_load(StepPlan(async_loads=[AsyncLoad("r1", (), fills, loads, 5.0)]))
    deadline = time.monotonic() + 5
    done: set[str] = set()
    while not done and time.monotonic() < deadline:
        done = side.finished_loads()
        time.sleep(0.005)
    assert done == {"r1"}
    assert side.take_failed_loads() == {"r1"} and side.take_failed_loads() == set()
    assert side.take_load_errors() == set()  # block ids are per group: never reported by block
    assert not any(tensor.any() for tensor in tensors.values())  # not even the good chunk was copied
    side.shutdown()


def test_start_up_reads_the_groups_and_refuses_what_kvtier_cannot_store_naming_it() -> None:
    from vllm.v1.kv_cache_interface import (ChunkedLocalAttentionSpec, FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec, SlidingWindowSpec)

    full = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
    window = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16, sliding_window=64)
    wide = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    groups = [KVCacheGroupSpec(["a"], window), KVCacheGroupSpec(["b"], full)]
    config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=groups)
    layout, names, kv_groups = _layout_of(config, "exact")
    assert names == ("a", "b") and kv_groups[0].sliding_window == 64 and "sliding_window:64x1" in layout.groups
    with pytest.raises(ConfigError, match="int8"):
        _layout_of(config, "int8")
    mixed = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["a"], window),
                                                                             KVCacheGroupSpec(["b"], wide)])
    with pytest.raises(LayoutError, match="page shape"):
        _layout_of(mixed, "exact")
    local = ChunkedLocalAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16,
                                      attention_chunk_size=8192)
    chunked = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["a"], local),
                                                                               KVCacheGroupSpec(["b"], full)])
    with pytest.raises(LayoutError, match="chunked-local attention.*8192"):
        _layout_of(chunked, "exact")
    # no full-attention group: GroupPlan refuses it (tests/unit/test_kv_groups.py)
