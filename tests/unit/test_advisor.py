"""`kvtier advise`: the offline replay agrees with a straightforward replay of the trace, grows with
capacity, and keeps its script interface."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.advisor.engine import engine_hits
from kvtier.advisor.simulate import KvtierSettings, TierSizes, num_distinct_chunks, replay
from kvtier.advisor.workload import read_workload
from kvtier.bench.trace import TRACE_BLOCK_TOKENS
from kvtier.cli import main
from kvtier.errors import ConfigError

SAMPLE = Path(__file__).parents[1] / "data" / "mooncake_sample.jsonl"
BLOCK = 64  # tokens per hash id in the generated traces
ENGINE_BLOCK = 16


def shared_tokens(a: list[int], a_tokens: int, b: list[int], b_tokens: int, block: int) -> int:
    """Tokens two Mooncake prompts share from the start: equal leading hash ids, each block as far
    as both prompts cover it."""
    shared = 0
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            break
        shared = min(a_tokens, b_tokens, (position + 1) * block)
    return shared


def straightforward_hits(records: list[tuple[list[int], int]], block: int, unit: int, engine_block: int) -> list[int]:
    """Per request, the tokens an unbounded cache of ``unit``-token pieces gives: the prefix some
    earlier request shares, cut to whole pieces, at most the last engine block before the last token."""
    hits = []
    for index, (ids, num_tokens) in enumerate(records):
        available = max((shared_tokens(ids, num_tokens, other, other_tokens, block)
                         for other, other_tokens in records[:index]), default=0)
        max_hit = (num_tokens - 1) // engine_block * engine_block
        hits.append(min(available // unit * unit, max_hit))
    return hits


def write_trace(path: Path, records: list[tuple[list[int], int]], block: int) -> None:
    """A Mooncake trace whose ``num_tokens`` are at ``block`` tokens per hash id."""
    lines = [{"timestamp": i * 100, "input_length": math.ceil(n * TRACE_BLOCK_TOKENS / block), "output_length": 4,
              "hash_ids": ids} for i, (ids, n) in enumerate(records)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@st.composite
def traces(draw: st.DrawFn) -> list[tuple[list[int], int]]:
    """Conversations that extend shared prefixes, plus one-off requests; lengths end anywhere in
    their last block."""
    records = []
    histories: list[list[int]] = [[0], [0, 1], [7]]
    next_id = 100
    for _ in range(draw(st.integers(1, 14))):
        base = draw(st.sampled_from(histories))
        extra = draw(st.integers(0, 3))
        ids = base + list(range(next_id, next_id + extra))
        next_id += extra
        if draw(st.booleans()):
            histories.append(ids)
        num_tokens = (len(ids) - 1) * BLOCK + draw(st.integers(1, BLOCK))
        records.append((ids, num_tokens))
    return records


def kvtier_settings(chunk: int, policy: str = "s3fifo", admission: str = "always") -> KvtierSettings:
    """Every chunk stored at first sight, as the straightforward replays below assume."""
    return KvtierSettings(chunk, ENGINE_BLOCK, 1000, policy, "write_through", admission)


def infinite_hits(path: Path, chunk: int, engine_tokens: int) -> tuple[list[int], list[int]]:
    workload = read_workload(str(path), BLOCK, chunk, ENGINE_BLOCK, None)
    engine = engine_hits(workload.requests, engine_tokens, ENGINE_BLOCK, workload.segment_tokens)
    unlimited = (num_distinct_chunks(workload) + 1) * chunk
    result = replay(workload, engine, kvtier_settings(chunk), TierSizes(unlimited, None))
    return engine, [o.hit_tokens for o in result.outcomes]


@settings(max_examples=60, deadline=None)
@given(records=traces(), chunk=st.sampled_from([16, 32, 128]))
def test_unlimited_kvtier_equals_a_straightforward_replay(tmp_path_factory: pytest.TempPathFactory,
                                                          records: list[tuple[list[int], int]], chunk: int) -> None:
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    write_trace(path, records, BLOCK)
    engine, hits = infinite_hits(path, chunk, engine_tokens=0)
    assert engine == [0] * len(records)
    assert hits == straightforward_hits(records, BLOCK, chunk, ENGINE_BLOCK)


def test_the_admission_rule_is_replayed_as_kvtier_applies_it(tmp_path: Path) -> None:
    # 40 one-off prompts of 4 blocks, then the last one again: kvtier's adaptive rule has measured no
    # reuse, so it stored the last prompt only at its second sight and the repeat recomputes it
    records = [([1000 + 10 * i + j for j in range(4)], 4 * BLOCK) for i in range(40)]
    records.append(records[-1])
    path = tmp_path / "t.jsonl"
    write_trace(path, records, BLOCK)
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    engine = engine_hits(workload.requests, 0, ENGINE_BLOCK, workload.segment_tokens)
    unlimited = TierSizes((num_distinct_chunks(workload) + 1) * 32, None)
    always = replay(workload, engine, kvtier_settings(32, admission="always"), unlimited)
    adaptive = replay(workload, engine, kvtier_settings(32, admission="adaptive"), unlimited)
    assert always.outcomes[-1].hit_tokens > 0
    assert adaptive.outcomes[-1].hit_tokens == 0
    assert adaptive.written_bytes["memory"] < always.written_bytes["memory"]


def test_the_last_token_is_always_computed(tmp_path: Path) -> None:
    # the same 128-token prompt twice: kvtier holds all 4 chunks, vLLM computes the last token, so
    # the hit stops at the last engine block before it
    path = tmp_path / "t.jsonl"
    write_trace(path, [([1, 2], 2 * BLOCK), ([1, 2], 2 * BLOCK)], BLOCK)
    assert infinite_hits(path, 32, engine_tokens=0)[1] == [0, 2 * BLOCK - ENGINE_BLOCK]


@settings(max_examples=40, deadline=None)
@given(records=traces())
def test_a_large_engine_cache_equals_a_straightforward_replay(tmp_path_factory: pytest.TempPathFactory,
                                                              records: list[tuple[list[int], int]]) -> None:
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    write_trace(path, records, BLOCK)
    engine, hits = infinite_hits(path, 32, engine_tokens=10**6)
    assert engine == straightforward_hits(records, BLOCK, ENGINE_BLOCK, ENGINE_BLOCK)
    assert hits == engine  # kvtier adds nothing the engine still holds


def test_a_small_engine_cache_evicts_tails_first_and_kvtier_brings_them_back(tmp_path: Path) -> None:
    # 13 engine blocks of 16 tokens. a (2 hash ids, 8 blocks + 1 decode block) and b (the same
    # size) do not both fit: b takes the 4 free blocks, then a's decode block and a's blocks from
    # its tail (vLLM frees a request's blocks in reverse order). c extends a: the engine still
    # holds a's first 4 blocks (64 tokens), kvtier holds all 4 of a's chunks (128 tokens).
    records = [([1, 2], 2 * BLOCK), ([3, 4], 2 * BLOCK), ([1, 2, 5], 3 * BLOCK)]
    path = tmp_path / "t.jsonl"
    write_trace(path, records, BLOCK)
    engine, hits = infinite_hits(path, 32, engine_tokens=13 * ENGINE_BLOCK)
    assert engine == [0, 0, 64]
    assert hits == [0, 0, 2 * BLOCK]


@settings(max_examples=40, deadline=None)
@given(records=traces())
def test_lru_hit_ratio_grows_with_capacity(tmp_path_factory: pytest.TempPathFactory,
                                           records: list[tuple[list[int], int]]) -> None:
    # LRU is a stack algorithm and every request offers all its chunks in the same order at every
    # size, so a larger memory holds a superset, once it can hold the longest prompt: below that, a
    # prompt's own tail evicts its head (its stores are pending, so not evictable, until the request
    # completes; see the next test). (S3-FIFO makes no such promise.)
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    write_trace(path, records, BLOCK)
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    zeros = [0] * len(workload.requests)
    longest = max(len(request.chunk_keys) for request in workload.requests) * 32
    ratios = [replay(workload, zeros, kvtier_settings(32, "lru"), TierSizes(capacity, None)).hit_ratio_tokens
              for capacity in (longest, longest + 32, 2 * longest, 4 * longest, 100 * longest)]
    assert ratios == sorted(ratios)


def test_a_prompt_longer_than_memory_evicts_its_own_head(tmp_path: Path) -> None:
    # kvtier's store offers a prompt's chunks in order; with 4 slots, the 5-chunk prompt's last
    # chunk evicts its first (the only ready entry left), so the next request sharing that prefix
    # misses; with 2 slots the tail's stores are dropped instead and the head survives.
    records = [([0], 32), ([7, 100], 64), ([0, 101, 102], 160), ([0, 103], 65)]
    path = tmp_path / "t.jsonl"
    write_trace(path, records, BLOCK)
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    hits = {slots: [o.hit_tokens for o in replay(workload, [0] * 4, kvtier_settings(32, "lru"),
                                                  TierSizes(slots * 32, None)).outcomes] for slots in (2, 4)}
    assert hits == {2: [0, 0, 0, 64], 4: [0, 0, 32, 0]}


def test_disk_tier_serves_what_memory_evicted(tmp_path: Path) -> None:
    records = [([1, 2], 2 * BLOCK), ([3, 4], 2 * BLOCK), ([1, 2, 5], 3 * BLOCK)]
    path = tmp_path / "t.jsonl"
    write_trace(path, records, BLOCK)
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    zeros = [0] * 3
    memory_only = replay(workload, zeros, kvtier_settings(32, "lru"), TierSizes(4 * 32, None))
    with_disk = replay(workload, zeros, kvtier_settings(32, "lru"), TierSizes(4 * 32, 100 * 32))
    assert memory_only.outcomes[2].hit_tokens == 0
    assert with_disk.outcomes[2].hit_tokens == with_disk.outcomes[2].disk_tokens == 2 * BLOCK
    assert with_disk.read_bytes["disk"] == 4 * 32 * 1000  # four whole chunks
    assert with_disk.written_bytes["disk"] == with_disk.written_bytes["memory"] > 0


def test_token_prompts_share_their_common_prefix(tmp_path: Path) -> None:
    system = list(range(1000, 1100))
    prompts = [system + [1] * 40, system + [2] * 40, list(range(5000, 5300))]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"token_ids": p, "timestamp": i}) + "\n" for i, p in enumerate(prompts)))
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    assert workload.format == "prompts"
    result = replay(workload, [0] * 3, kvtier_settings(32), TierSizes(10**6, None))
    assert [o.hit_tokens for o in result.outcomes] == [0, 96, 0]  # 3 whole chunks of the 100 shared tokens


def test_json_interface(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "advise.png"
    code = main(["advise", str(SAMPLE), "--block-tokens", "512", "--capacity-tokens", "1024,4096,2048",
                 "--engine-cache-tokens", "0", "--json", "--plot", str(plot)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["infinite"]["capacity_tokens"] is None
    assert [row["capacity_tokens"] for row in result["capacities"]] == [1024, 2048, 4096]
    for row in [*result["capacities"], result["infinite"]]:
        assert 0 <= row["hit_ratio_tokens"] <= 1 and 0 <= row["hit_ratio_mean_per_request"] <= 1
        assert row["hit_ratio_tokens"] <= result["infinite"]["hit_ratio_tokens"] + 1e-12
    assert result["infinite"]["hit_ratio_tokens"] > 0.5  # the sample's conversations share most tokens
    assert result["advice"] and plot.stat().st_size > 0


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("not json\n", "t.jsonl:1: not JSON"),
                                              ('{"a": 1}\n', "neither a Mooncake record"),
                                              ('{"timestamp": 1, "input_length": 9}\n', "t.jsonl:1")])
def test_bad_traces_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                                        message: str) -> None:
    path = tmp_path / "t.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["advise", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[0] and "Traceback" not in err


def test_sizes_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--chunk-tokens"):
        read_workload(str(SAMPLE), 512, 200, 16, None)
    with pytest.raises(ConfigError, match="--block-tokens"):
        read_workload(str(SAMPLE), 100, 256, 16, None)


def test_calibration_recovers_the_prefill_speed_from_bench_requests(tmp_path: Path) -> None:
    from kvtier.advisor.timing import PROFILES, calibrate

    def ttft(num: int, cached: int) -> float:
        return 0.02 + 1e-4 * (num - cached) + 1e-8 * (num ** 2 - cached ** 2)

    rows = [{"index": i, "repeat": repeat, "num_prompt_tokens": num, "num_cached_tokens": cached,
             "ttft_s": ttft(num, cached) * (5.0 if (i, repeat) == (0, 1) else 1.0)}  # one stray slow request
            for i, (num, cached) in enumerate([(500, 0), (1000, 0), (2000, 512), (3000, 0), (3000, 2048), (800, 128)])
            for repeat in (1, 2, 3)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"configurations": {"vllm": {"requests": rows}}}))
    profile = calibrate(PROFILES["cpu-smollm2"], str(path), 4096)
    assert profile.overhead_s == pytest.approx(0.02, rel=1e-6)
    assert profile.per_token_s == pytest.approx(1e-4, rel=1e-6)
    assert profile.per_token2_s == pytest.approx(1e-8, rel=1e-5)
    assert profile.kv_bytes_per_token == 4096 and str(path) in profile.source
    path.write_text("{}")
    with pytest.raises(ConfigError, match="--calibration"):
        calibrate(PROFILES["cpu-smollm2"], str(path), None)


def test_text_prompts_need_a_tokenizer_and_share_their_prefix(tmp_path: Path) -> None:
    words = {"system": [11] * 64, "question": [12] * 10, "other": [13] * 10}

    def encode(text: str) -> list[int]:
        return [token for word in text.split() for token in words[word]]

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "system question"}) + "\n" + json.dumps({"prompt": "system other"}) + "\n")
    with pytest.raises(ConfigError, match="--tokenizer"):
        read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None)
    workload = read_workload(str(path), BLOCK, 32, ENGINE_BLOCK, None, encode)
    result = replay(workload, [0, 0], kvtier_settings(32), TierSizes(10**6, None))
    assert [o.hit_tokens for o in result.outcomes] == [0, 64]


def test_output_cap_and_missing_tokenizer_on_the_command_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", str(SAMPLE), "--engine-cache-tokens", "0", "--max-output-tokens", "1", "--json",
                 "--capacity-tokens", "4096"]) == 0
    assert json.loads(capsys.readouterr().out)["capacities"][0]["capacity_tokens"] == 4096
    assert main(["advise", str(SAMPLE), "--tokenizer", str(tmp_path)]) == 2
    assert "--tokenizer: cannot load" in capsys.readouterr().err
