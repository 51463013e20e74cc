"""Planning with several KV cache groups (``kvtier.kvgroups``): which blocks of a chunk each group
stores and loads, checked against vLLM's own rule for the blocks a sliding window still needs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import LayoutError
from kvtier.kvgroups import NULL_BLOCK_ID, GroupPlan, KVGroup
from kvtier.plans import BlockRun

FULL = KVGroup(("l0", "l3"))


def vllm_needed_blocks(window: int | None, num_computed_tokens: int, block_size: int) -> int:
    """vLLM's SlidingWindowManager: get_num_skipped_tokens(n) = max(0, n - window + 1), and the
    blocks wholly skipped are those before skipped // block_size (written out independently)."""
    if window is None:
        return 0
    skipped = num_computed_tokens - window + 1
    return skipped // block_size if skipped > 0 else 0


def block_table(group: int, num_blocks: int) -> list[int]:
    """A request's blocks in one group: distinct ids per group, none the null block."""
    return [1000 * (group + 1) + index for index in range(num_blocks)]


def positions(run: BlockRun, chunk_index: int, blocks_per_chunk: int) -> set[int]:
    first = chunk_index * blocks_per_chunk + run.first_block
    return set(range(first, first + len(run.block_ids)))


def test_a_full_group_stores_the_whole_chunk_and_a_small_window_only_its_tail() -> None:
    # blocks of 4 tokens, chunks of 4 blocks; a window of 6 tokens needs, after 16 tokens, the
    # tokens from 11 on: blocks 2 and 3 of the chunk (block 2 holds token 11)
    plan = GroupPlan((FULL, KVGroup(("l1", "l2"), sliding_window=6)), block_size=4, blocks_per_chunk=4)
    runs = plan.store_runs(0, [block_table(0, 8), block_table(1, 8)], 0)
    assert runs == (BlockRun(0, (1000, 1001, 1002, 1003)), BlockRun(2, (2002, 2003)))
    # the second chunk: tokens 16..31, window needs tokens 27..31: blocks 6 and 7
    runs = plan.store_runs(1, [block_table(0, 8), block_table(1, 8)], 0)
    assert runs == (BlockRun(0, (1004, 1005, 1006, 1007)), BlockRun(2, (2006, 2007)))


def test_a_window_wider_than_the_chunk_stores_the_whole_chunk() -> None:
    plan = GroupPlan((KVGroup(("s",), sliding_window=512), FULL), block_size=16, blocks_per_chunk=16)
    assert plan.full_index == 1
    runs = plan.store_runs(3, [block_table(0, 64), block_table(1, 64)], 0)
    assert runs is not None and [len(run.block_ids) for run in runs] == [16, 16]


def test_a_chunk_whose_needed_block_is_the_null_block_or_missing_is_not_stored() -> None:
    plan = GroupPlan((FULL, KVGroup(("s",), sliding_window=6)), block_size=4, blocks_per_chunk=4)
    window = block_table(1, 8)
    window[3] = NULL_BLOCK_ID  # vLLM freed it (a local prefix hit skipped it)
    assert plan.store_runs(0, [block_table(0, 8), window], 0) is None
    window[0] = NULL_BLOCK_ID  # outside the window at the chunk's end: not needed, not read
    window[3] = 2003
    assert plan.store_runs(0, [block_table(0, 8), window], 0) is not None
    assert plan.store_runs(1, [block_table(0, 8), block_table(1, 7)], 0) is None  # not allocated yet


def test_a_chunk_whose_window_blocks_vllm_may_have_freed_is_not_stored() -> None:
    """vLLM frees a window's blocks on the tokens processed before a step; kvtier's copy of the
    block table never sees it. A chunk stored after the step that completed it (accepted draft
    tokens) read a freed block, maybe reused by another request (review finding)."""
    plan = GroupPlan((FULL, KVGroup(("s",), sliding_window=6)), block_size=4, blocks_per_chunk=4)
    tables = [block_table(0, 8), block_table(1, 8)]
    assert plan.store_runs(0, tables, 12) is not None  # the window's blocks 2, 3 of chunk 0 are held
    assert plan.store_runs(0, tables, 19) is None  # 19 - 6 + 1 = 14 tokens skipped: blocks 0-2 freed, 2 needed
    assert plan.store_runs(1, tables, 19) is not None  # chunk 1's window (blocks 6, 7) still held


def test_a_model_without_a_full_attention_group_is_refused_naming_the_windows() -> None:
    with pytest.raises(LayoutError, match="full-attention KV cache group.*windows 128, 256"):
        GroupPlan((KVGroup(("a",), 128), KVGroup(("b",), 256)), block_size=16, blocks_per_chunk=4)


def test_a_load_inside_a_chunk_that_lacks_window_blocks_ends_at_the_chunk_start() -> None:
    plan = GroupPlan((FULL, KVGroup(("s",), sliding_window=6)), block_size=4, blocks_per_chunk=4)
    # a hit of 24 tokens needs tokens 19.. (blocks 4, 5); chunk 1 stored blocks 6 and 7 only
    assert plan.load_end(24) == 16
    assert plan.load_end(32) == 32  # a chunk end: what the chunk stored is exactly what is needed
    wide = GroupPlan((FULL, KVGroup(("s",), sliding_window=64)), block_size=4, blocks_per_chunk=4)
    assert wide.load_end(24) == 24  # the window kept the whole chunk


def test_load_runs_of_the_tiny_case() -> None:
    plan = GroupPlan((FULL, KVGroup(("s",), sliding_window=6)), block_size=4, blocks_per_chunk=4)
    tables = [block_table(0, 8), block_table(1, 8)]
    # vLLM computed block 0 itself; kvtier loads up to 32 tokens
    assert plan.chunk_load_runs(0, 1, 32, tables) == (BlockRun(1, (1001, 1002, 1003)), BlockRun(0, ()))
    assert plan.chunk_load_runs(1, 1, 32, tables) == (BlockRun(0, (1004, 1005, 1006, 1007)), BlockRun(2, (2006, 2007)))


@settings(max_examples=300, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4, 16]), blocks_per_chunk=st.integers(1, 6),
       windows=st.lists(st.one_of(st.none(), st.integers(1, 80)), min_size=1, max_size=3),
       num_chunks=st.integers(1, 5), data=st.data())
def test_every_block_a_load_needs_was_stored_and_nothing_else_is_loaded(block_size: int, blocks_per_chunk: int,
                                                                       windows: list[int | None], num_chunks: int,
                                                                       data: st.DataObject) -> None:
    groups = (FULL, *(KVGroup((f"g{index}",), window) for index, window in enumerate(windows)))
    plan = GroupPlan(groups, block_size, blocks_per_chunk)
    num_blocks = num_chunks * blocks_per_chunk
    hit_block = data.draw(st.integers(1, num_blocks), label="hit_block")
    start_block = data.draw(st.integers(0, hit_block - 1), label="start_block")  # vLLM's own hit
    tables = [block_table(index, num_blocks) for index in range(len(groups))]
    end = plan.load_end(hit_block * block_size)
    chunk_tokens = blocks_per_chunk * block_size
    # the load keeps at least every whole chunk of the hit
    assert hit_block * block_size // chunk_tokens * chunk_tokens <= end <= hit_block * block_size
    end_block = end // block_size
    for chunk in range(start_block // blocks_per_chunk, -(-end_block // blocks_per_chunk)):
        stored = plan.store_runs(chunk, tables, 0)
        assert stored is not None
        loaded = plan.chunk_load_runs(chunk, start_block, end, tables)
        assert len(loaded) == len(groups)
        for index, (group, store_run, load_run) in enumerate(zip(groups, stored, loaded)):
            have = positions(store_run, chunk, blocks_per_chunk)
            want = positions(load_run, chunk, blocks_per_chunk)
            assert want <= have, f"group {index} loads blocks its chunk did not store"
            # exactly what vLLM needs at the load's end, in this chunk, beyond vLLM's own hit
            first = max(start_block, chunk * blocks_per_chunk,
                        vllm_needed_blocks(group.sliding_window, end, block_size))
            assert want == set(range(first, min(end_block, (chunk + 1) * blocks_per_chunk)))
            assert load_run.block_ids == tuple(tables[index][position] for position in sorted(want))
        # stores: exactly the blocks of the chunk the window needs at the chunk's end
        chunk_end = (chunk + 1) * chunk_tokens
        for group, store_run in zip(groups, stored):
            first = max(chunk * blocks_per_chunk, vllm_needed_blocks(group.sliding_window, chunk_end, block_size))
            assert positions(store_run, chunk, blocks_per_chunk) == set(range(first, (chunk + 1) * blocks_per_chunk))
