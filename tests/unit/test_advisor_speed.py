"""The advisor's fast paths give the results of the plain ones: the engine model's books against a
one-block-at-a-time block pool, and a sweep over worker processes against replays in turn."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.advisor.engine import engine_hits
from kvtier.advisor.simulate import TierSizes, replay
from kvtier.advisor.sweep import replay_sizes
from kvtier.advisor.workload import SimRequest, read_workload
from tests.unit.test_advisor import BLOCK, ENGINE_BLOCK, SAMPLE, kvtier_settings, traces, write_trace


def block_pool_hits(requests: tuple[SimRequest, ...], num_blocks: int, block: int, per_segment: int) -> list[int]:
    """vLLM's block pool one block at a time: a free queue of physical blocks, oldest first; a block
    caches the content (node, block within the segment); a hit takes the oldest copy; a request
    allocates from the front and gives its blocks back in reverse order."""
    free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(num_blocks))
    cached: dict[int, tuple[int, int]] = {}
    copies: dict[tuple[int, int], list[int]] = {}
    hits = []
    for request in requests:
        num_full = request.num_tokens // block
        num_total = -(-(request.num_tokens + request.num_output_tokens - 1) // block)
        contents = [(request.nodes[i // per_segment], i % per_segment) for i in range(num_full)]
        held = []
        for content in contents[:(request.num_tokens - 1) // block]:
            if not copies.get(content):
                break
            held.append(copies[content][0])
            free.pop(copies[content][0], None)
        hits.append(len(held) * block)
        for index in range(len(held), num_total):
            physical, _ = free.popitem(last=False)
            if physical in cached:
                copies[cached[physical]].remove(physical)
                del cached[physical]
            if index < num_full:
                cached[physical] = contents[index]
                copies.setdefault(contents[index], []).append(physical)
            held.append(physical)
        for physical in reversed(held):
            free[physical] = None
    return hits


@settings(max_examples=80, deadline=None)
@given(records=traces(), num_blocks=st.integers(8, 64))
def test_the_engine_model_equals_a_block_pool_kept_one_block_at_a_time(
        tmp_path_factory: pytest.TempPathFactory, records: list[tuple[list[int], int]], num_blocks: int) -> None:
    path = tmp_path_factory.mktemp("t") / "t.jsonl"
    write_trace(path, records, BLOCK)
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    longest = max(r.num_tokens + r.num_output_tokens for r in workload.requests)
    num_blocks = max(num_blocks, -(-longest // ENGINE_BLOCK))
    expected = block_pool_hits(workload.requests, num_blocks, ENGINE_BLOCK, BLOCK // ENGINE_BLOCK)
    assert engine_hits(workload.requests, num_blocks * ENGINE_BLOCK, ENGINE_BLOCK, BLOCK) == expected


def test_the_engine_model_on_the_sample_trace_with_copies_and_evictions() -> None:
    workload = read_workload(str(SAMPLE), 512, 256, 128, None)
    for num_blocks in (48, 64, 200):  # small caches evict; the last-token rule makes second copies
        expected = block_pool_hits(workload.requests, num_blocks, 128, 512 // 128)
        assert engine_hits(workload.requests, num_blocks * 128, 128, 512) == expected


def test_a_sweep_over_processes_equals_replays_in_turn(tmp_path: Path) -> None:
    workload = read_workload(str(SAMPLE), 128, 128, 128, None)
    hits = engine_hits(workload.requests, 0, 128, 128)  # no engine cache: kvtier serves every hit
    sizes = [TierSizes(capacity, None) for capacity in (256, 1024, 4096)] + [TierSizes(512, 2048)]
    in_turn = [replay(workload, hits, kvtier_settings(128), size) for size in sizes]
    assert replay_sizes(workload, hits, kvtier_settings(128), sizes, jobs=2) == in_turn
    assert len({result.hit_ratio_tokens for result in in_turn}) > 1  # the sizes do differ
