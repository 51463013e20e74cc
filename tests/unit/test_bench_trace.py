"""Trace replay: prompts share exactly the blocks the trace says they share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvtier.bench.specs import TokenPrompt
from kvtier.bench.trace import (TRACE_BLOCK_TOKENS, TraceParams, TraceRecord, block_token_ids, make_sample_trace,
                                parse_record, prompt_token_ids, read_trace, trace_workload)
from kvtier.errors import ConfigError

SAMPLE = Path(__file__).parents[1] / "data" / "mooncake_sample.jsonl"
ID_RANGE = (3072, 49152)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_blocks(a: TraceRecord, b: TraceRecord) -> int:
    return common_prefix(a.hash_ids, b.hash_ids)


@pytest.mark.parametrize("block_tokens", [TRACE_BLOCK_TOKENS, 128])
def test_prompts_share_exactly_the_traced_blocks(block_tokens: int) -> None:
    records = read_trace(str(SAMPLE), None)
    prompts = [prompt_token_ids(r, block_tokens, 10**9, ID_RANGE) for r in records]
    num_pairs_sharing = 0
    for i, (a, pa) in enumerate(zip(records, prompts)):
        for b, pb in zip(records[i + 1:], prompts[i + 1:]):
            blocks = shared_blocks(a, b)
            shortest = min(len(pa), len(pb))
            lcp = common_prefix(pa, pb)
            # the shared blocks are identical token for token ...
            assert lcp >= min(blocks * block_tokens, shortest)
            # ... and the first differing hash id starts a different block (when both have it)
            if blocks < min(len(a.hash_ids), len(b.hash_ids)) and shortest > blocks * block_tokens:
                assert lcp < (blocks + 1) * block_tokens
                assert pa[blocks * block_tokens:(blocks + 1) * block_tokens] != pb[blocks * block_tokens:
                                                                                   (blocks + 1) * block_tokens]
            num_pairs_sharing += blocks > 0
    assert num_pairs_sharing > 20  # the sample does share prefixes


def test_same_hash_id_same_tokens_anywhere() -> None:
    assert block_token_ids(7, 512, ID_RANGE) == block_token_ids(7, 512, ID_RANGE)
    assert block_token_ids(7, 512, ID_RANGE) != block_token_ids(8, 512, ID_RANGE)
    assert all(ID_RANGE[0] <= t < ID_RANGE[1] for t in block_token_ids(7, 512, ID_RANGE))
    assert block_token_ids(7, 128, ID_RANGE) == block_token_ids(7, 512, ID_RANGE)[:128]


def test_lengths_scale_and_truncate_whole_blocks() -> None:
    record = TraceRecord(0.0, 1300, 10, (1, 2, 3))  # two full blocks and 276 tokens
    assert len(prompt_token_ids(record, 512, 10**9, ID_RANGE)) == 1300
    assert len(prompt_token_ids(record, 128, 10**9, ID_RANGE)) == math.ceil(1300 * 128 / 512)
    truncated = prompt_token_ids(record, 512, 1100, ID_RANGE)  # the third block does not fit: dropped
    assert truncated == prompt_token_ids(record, 512, 10**9, ID_RANGE)[:1024]


def test_workload_arrivals_and_output_cap() -> None:
    params = TraceParams(str(SAMPLE), speed=2.0, block_tokens=128, max_tokens=16, max_requests=5)
    workload = trace_workload(params, ID_RANGE, max_prompt_tokens=4000)
    records = read_trace(str(SAMPLE), 5)
    assert len(workload.requests) == 5
    for request, record in zip(workload.requests, records):
        assert request.arrival_s == pytest.approx((record.timestamp_ms - records[0].timestamp_ms) / 1000 / 2.0)
        assert request.max_tokens == min(record.output_length, 16)
        assert isinstance(request.prompt, TokenPrompt)
    with pytest.raises(ConfigError, match="--speed"):
        trace_workload(TraceParams(str(SAMPLE), speed=0), ID_RANGE, 4000)


def test_bad_records_name_the_line() -> None:
    with pytest.raises(ConfigError, match="t.jsonl:3"):
        parse_record('{"timestamp": 1, "input_length": 10}', "t.jsonl:3")
    with pytest.raises(ConfigError, match="per hash id"):
        parse_record('{"timestamp": 1, "input_length": 1000, "output_length": 1, "hash_ids": [1]}', "x")


def test_the_shipped_sample_is_what_the_script_writes() -> None:
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert lines == make_sample_trace(num_requests=20, seed=0)


def test_prompts_beyond_the_context_are_refused_unless_cut_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 3000, "output_length": 4, "hash_ids": [1] * 6}) + "\n"
                    + json.dumps({"timestamp": 1, "input_length": 1000, "output_length": 4, "hash_ids": [1, 2]}) + "\n")
    with pytest.raises(ConfigError, match=r"--max-input-tokens.*3,000 tokens.*keeps 76\.2%"):
        trace_workload(TraceParams(str(path)), ID_RANGE, max_prompt_tokens=2100)
    workload = trace_workload(TraceParams(str(path), max_input_tokens=2100), ID_RANGE, max_prompt_tokens=2100)
    assert [len(r.prompt.token_ids) for r in workload.requests] == [2048, 1000]
    assert dict(workload.parameters)["input_tokens_kept"] == "76.2%"
    whole = trace_workload(TraceParams(str(path)), ID_RANGE, max_prompt_tokens=4000)
    assert dict(whole.parameters)["input_tokens_kept"] == "100.0%"


@pytest.mark.parametrize("flag", ["--qps", "--seed"])
def test_flags_a_trace_ignores_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.bench.options import workload_params
    from kvtier.cli import build_parser, main

    args = build_parser().parse_args(["bench", "trace", str(SAMPLE), flag, "2"])
    with pytest.raises(ConfigError, match=f"{flag}: a trace replays its own timestamps"):
        workload_params(args)
    assert main(["bench", "trace", str(SAMPLE), flag, "2", "--model", "/nonexistent"]) == 2
    assert f"{flag}: a trace replays" in capsys.readouterr().err
    chat = workload_params(build_parser().parse_args(["bench", "chat"]))
    assert (chat.qps, chat.seed) == (1.0, 0)  # the other workloads keep their defaults
    assert workload_params(build_parser().parse_args(["bench", "chat", flag, "2"])) != chat


def test_blocks_below_kvtiers_chunk_run_kvtier_with_chunks_of_one_block(tmp_path: Path) -> None:
    from kvtier.bench.configs import KVTIER_CHUNK_TOKENS, RemoteOptions, all_configs
    from kvtier.bench.trace import kvtier_chunk_tokens
    from kvtier.config import load_config
    from kvtier.keys import Namespace, chunk_keys

    assert KVTIER_CHUNK_TOKENS == load_config({}, {}).config.chunk_tokens
    # two requests share one hash id (a one-block system prompt) and nothing else
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 1024, "output_length": 4, "hash_ids": [7, 1]}) + "\n"
                    + json.dumps({"timestamp": 1, "input_length": 1024, "output_length": 4, "hash_ids": [7, 2]}) + "\n")
    workload = trace_workload(TraceParams(str(path), block_tokens=128), ID_RANGE, max_prompt_tokens=4000)
    chunk = kvtier_chunk_tokens(128)
    assert chunk == 128 and dict(workload.parameters)["kvtier_chunk_tokens"] == 128
    digest = Namespace("t", "m", b"x").digest()
    a, b = (chunk_keys(digest, r.prompt.token_ids, chunk) for r in workload.requests)
    assert a[0] == b[0] and a[1] != b[1]  # the shared block is a whole chunk: kvtier can serve it
    # at kvtier's default chunk the shared block is half a chunk: no key in common (what the fix avoids)
    a, b = (chunk_keys(digest, r.prompt.token_ids, KVTIER_CHUNK_TOKENS) for r in workload.requests)
    assert a[0] != b[0]
    configs = all_configs("1GiB", RemoteOptions(None, None, None), chunk)
    assert all(dict(c.kvtier_keys)["chunk_tokens"] == 128 for c in configs if c.kvtier_keys is not None)
    # ... as kvtier's inline config takes it (a text "128" failed the server's start-up)
    from kvtier.bench.configs import kvtier_inline_keys
    keys = kvtier_inline_keys(configs[1], 9000, "/tmp/d", "ns")
    assert load_config(keys, {}).config.chunk_tokens == 128
    assert all("chunk_tokens" not in dict(c.kvtier_keys or ()) for c in all_configs("1GiB", RemoteOptions(None, None,
                                                                                                          None)))
    assert kvtier_chunk_tokens(256) is None and kvtier_chunk_tokens(512) is None


@pytest.mark.parametrize("block_tokens", [64, 100, 192])
def test_blocks_kvtier_could_never_serve_are_refused(block_tokens: int) -> None:
    with pytest.raises(ConfigError, match=rf"--block-tokens: {block_tokens} tokens per hash id is below kvtier's "
                                          r"chunk of 256 tokens .*pass --block-tokens 128"):
        trace_workload(TraceParams(str(SAMPLE), block_tokens=block_tokens), ID_RANGE, max_prompt_tokens=4000)
