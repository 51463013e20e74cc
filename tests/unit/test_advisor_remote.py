"""The remote tier in the advisor: uploads of what memory stores, reads after memory and disk, and
the server's LRU (Redis allkeys-lru) or no eviction at all (S3 within its TTL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings

from kvtier.advisor.engine import engine_hits
from kvtier.advisor.remote import RemoteModel
from kvtier.advisor.simulate import UNBOUNDED, TierSizes, replay
from kvtier.advisor.workload import read_workload
from kvtier.cli import main
from tests.unit.test_advisor import BLOCK, ENGINE_BLOCK, SAMPLE, kvtier_settings, straightforward_hits, traces, \
    write_trace

KV_BYTES = 1000  # kvtier_settings' bytes per token


def test_the_remote_model_is_an_lru_of_entries() -> None:
    remote = RemoteModel(2)
    assert remote.upload(b"a") and remote.upload(b"b") and not remote.upload(b"a")  # a: the most recent
    assert remote.upload(b"c") and remote.num_evictions == 1  # b went
    assert remote.held_run([b"a", b"c", b"b"]) == 2
    unbounded = RemoteModel(None)
    assert all(unbounded.upload(bytes([i])) for i in range(100)) and unbounded.num_evictions == 0
    with pytest.raises(ValueError):
        RemoteModel(0)


@settings(max_examples=40, deadline=None)
@given(records=traces())
def test_an_unbounded_remote_behind_a_small_memory_serves_every_shared_prefix(
        tmp_path_factory: pytest.TempPathFactory, records: list[tuple[list[int], int]]) -> None:
    path = tmp_path_factory.mktemp("t") / "t.jsonl"
    write_trace(path, records, BLOCK)
    chunk = 32
    workload = read_workload(str(path), BLOCK, chunk, ENGINE_BLOCK, None)
    hits = engine_hits(workload.requests, 0, ENGINE_BLOCK, workload.segment_tokens)
    longest = max(len(r.chunk_keys) for r in workload.requests)
    small = TierSizes((longest + 1) * chunk, None)  # holds one request, not the trace
    result = replay(workload, hits, kvtier_settings(chunk), TierSizes(small.memory_tokens, None, UNBOUNDED))
    assert [o.hit_tokens for o in result.outcomes] == straightforward_hits(records, BLOCK, chunk, ENGINE_BLOCK)
    alone = replay(workload, hits, kvtier_settings(chunk), small)
    assert result.hit_ratio_tokens >= alone.hit_ratio_tokens
    # every chunk is uploaded once, every remote token read is a whole chunk read
    distinct = len({key for r in workload.requests for key in r.chunk_keys})
    assert result.written_bytes["remote"] == distinct * chunk * KV_BYTES
    remote_tokens = sum(o.remote_tokens for o in result.outcomes)
    assert result.read_bytes["remote"] >= remote_tokens * KV_BYTES
    assert sum(o.memory_tokens + o.disk_tokens + o.remote_tokens for o in result.outcomes) == \
        sum(o.hit_tokens - o.engine_hit_tokens for o in result.outcomes)


def test_a_bounded_remote_forgets_the_least_recently_used(tmp_path: Path) -> None:
    # A, then B (each two whole chunks and one token), then A again; memory holds two chunks
    records = [([1, 2, 3], 2 * BLOCK + 1), ([4, 5, 6], 2 * BLOCK + 1), ([1, 2, 3], 2 * BLOCK + 1)]
    path = tmp_path / "t.jsonl"
    write_trace(path, records, BLOCK)
    workload = read_workload(str(path), BLOCK, BLOCK, ENGINE_BLOCK, None)
    hits = engine_hits(workload.requests, 0, ENGINE_BLOCK, BLOCK)

    def run(remote_tokens: int | None) -> list[int]:
        result = replay(workload, hits, kvtier_settings(BLOCK), TierSizes(2 * BLOCK, None, remote_tokens))
        return [o.remote_tokens for o in result.outcomes]

    assert run(None) == [0, 0, 0]  # B pushed A out of memory
    assert run(2 * BLOCK) == [0, 0, 0]  # ... and out of a two-chunk remote (B was uploaded after A)
    assert run(4 * BLOCK) == [0, 0, 2 * BLOCK]  # a four-chunk remote still holds A


def test_sweeping_the_remote_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["advise", str(SAMPLE), "--block-tokens", "512", "--tier", "remote", "--memory-tokens", "2048",
                 "--capacity-tokens", "1024,8192", "--engine-cache-tokens", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tier"] == "remote" and result["memory_tokens"] == 2048
    small, large = result["capacities"]
    assert large["hit_ratio_tokens"] > small["hit_ratio_tokens"]
    assert large["read_bytes"]["remote"] > 0 and large["written_bytes"]["remote"] > 0
    assert large["evictions"]["remote"] < small["evictions"]["remote"]
    main(["advise", str(SAMPLE), "--block-tokens", "512", "--memory-tokens", "2048", "--capacity-tokens", "2048",
          "--remote-tokens", "unbounded", "--disk-tokens", "4096", "--engine-cache-tokens", "0"])
    table = capsys.readouterr().out
    assert "read remote" in table and "written remote" in table


def test_advice_says_when_loads_cost_more_than_they_save() -> None:
    from kvtier.advisor.report import CapacityRow, advice

    def row(capacity: int | None, hit: float, saved_s: float) -> CapacityRow:
        return CapacityRow(capacity, hit, hit, 1.0, saved_s, 0.0, 0.0, {}, {}, {})

    slow = advice("remote", [row(100, 0.36, -0.054)], row(None, 0.37, -0.055), 0.05, str)
    assert "ADDS 54 ms of mean TTFT" in slow and "cost_gate" in slow and "saves" not in slow
    fast = advice("memory", [row(100, 0.36, 0.126)], row(None, 0.37, 0.13), 0.05, str)
    assert "saves 126 ms of mean TTFT" in fast
