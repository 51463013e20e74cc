"""Trace replay: a Mooncake-format JSONL trace turned into token prompts.

A trace line is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [..]}``;
each hash id names one block of ``TRACE_BLOCK_TOKENS`` (512) prompt tokens, and two requests share
a block exactly when they list the same hash id at that position. Replay gives every hash id its
own tokens, a pure function of the id (``block_token_ids``), so prompts share exactly the blocks
the trace says they share, on every machine and in every run.

``block_tokens`` may scale the trace down (e.g. 128 tokens per hash id on a CPU): input lengths
scale by the same factor and the block structure is kept. Below kvtier's chunk (256 tokens) a
shared one-block prefix would be shorter than a chunk and never served by kvtier, so kvtier's
servers then run with ``chunk_tokens`` equal to ``block_tokens`` (``kvtier_chunk_tokens``; a size
that is not a multiple of the engine's block is refused). Prompts longer than the bench's context
are refused unless ``max_input_tokens`` is given, which drops trailing blocks of longer prompts
(the share of the trace's input tokens kept is a workload parameter, in the report); output lengths are capped by ``max_tokens``; arrivals are the
timestamps, relative to the first, divided by ``speed``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from kvtier.bench.configs import BLOCK_TOKENS, KVTIER_CHUNK_TOKENS
from kvtier.bench.specs import BenchRequest, TokenPrompt, Workload, parameter_items, random_token_ids
from kvtier.errors import ConfigError

TRACE_BLOCK_TOKENS = 512
_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class TraceParams:
    path: str
    speed: float = 1.0
    block_tokens: int = TRACE_BLOCK_TOKENS
    max_input_tokens: int | None = None  # None: the context limit of the bench
    max_tokens: int = 32
    max_requests: int | None = None  # None: every line


def parse_record(line: str, where: str) -> TraceRecord:
    """One trace line. Raises ConfigError naming ``where`` (file:line) if a field is missing or
    inconsistent (more tokens than its hash ids cover)."""
    try:
        raw = json.loads(line)
        record = TraceRecord(float(raw["timestamp"]), int(raw["input_length"]), int(raw["output_length"]),
                             tuple(int(h) for h in raw["hash_ids"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(where, f"not a Mooncake trace record (fields {', '.join(_FIELDS)}): {exc}") from None
    if record.input_length < 1 or record.input_length > len(record.hash_ids) * TRACE_BLOCK_TOKENS:
        raise ConfigError(where, f"input_length {record.input_length} needs 1 to "
                                 f"{TRACE_BLOCK_TOKENS} tokens per hash id ({len(record.hash_ids)} given)")
    return record


def read_trace(path: str, max_requests: int | None) -> list[TraceRecord]:
    """The records of a JSONL trace, in file order (blank lines skipped). Raises ConfigError."""
    records = []
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                records.append(parse_record(line, f"{path}:{number}"))
            if max_requests is not None and len(records) >= max_requests:
                break
    if not records:
        raise ConfigError(path, "the trace holds no record")
    return records


def block_token_ids(hash_id: int, block_tokens: int, id_range: tuple[int, int]) -> tuple[int, ...]:
    """The tokens of the block a hash id names: a pure function of the id."""
    return random_token_ids(hash_id * 2_654_435_761 + 97, block_tokens, id_range)


def scaled_input_tokens(record: TraceRecord, block_tokens: int) -> int:
    """The record's input length at ``block_tokens`` tokens per hash id."""
    return math.ceil(record.input_length * block_tokens / TRACE_BLOCK_TOKENS)


def prompt_token_ids(record: TraceRecord, block_tokens: int, max_input_tokens: int,
                     id_range: tuple[int, int]) -> tuple[int, ...]:
    """The record's prompt: block i is the first tokens of ``block_token_ids(hash_ids[i])``; every
    block is whole except possibly the last (the input length, scaled to ``block_tokens`` per hash
    id, decides its size). Blocks beyond ``max_input_tokens`` are dropped, whole."""
    num_tokens = scaled_input_tokens(record, block_tokens)
    num_blocks = math.ceil(num_tokens / block_tokens)
    if num_tokens > max_input_tokens:
        num_blocks = max(1, max_input_tokens // block_tokens)
        num_tokens = min(num_tokens, num_blocks * block_tokens)
    tokens: list[int] = []
    for position, hash_id in enumerate(record.hash_ids[:num_blocks]):
        size = min(block_tokens, num_tokens - position * block_tokens)
        tokens.extend(block_token_ids(hash_id, block_tokens, id_range)[:size])
    return tuple(tokens)


def kvtier_chunk_tokens(block_tokens: int) -> int | None:
    """The ``chunk_tokens`` kvtier's servers run with for a trace of ``block_tokens`` per hash id:
    None (kvtier's default, 256) when a hash id's block holds a whole chunk; ``block_tokens`` when it
    is smaller but a multiple of the engine's block (128), so a shared one-block prefix (a system
    prompt) is a whole chunk kvtier can serve. Raises ConfigError otherwise: kvtier could never serve
    a block the trace shares on its own."""
    if block_tokens >= KVTIER_CHUNK_TOKENS:
        return None
    if block_tokens % BLOCK_TOKENS == 0:
        return block_tokens
    raise ConfigError("--block-tokens", f"{block_tokens} tokens per hash id is below kvtier's chunk of "
                                        f"{KVTIER_CHUNK_TOKENS} tokens and not a multiple of the engine's "
                                        f"{BLOCK_TOKENS}-token block, so kvtier could never serve a block the "
                                        f"trace shares; pass --block-tokens {BLOCK_TOKENS} (kvtier then runs with "
                                        f"chunk_tokens {BLOCK_TOKENS}) or {KVTIER_CHUNK_TOKENS} or more")


def trace_workload(params: TraceParams, id_range: tuple[int, int], max_prompt_tokens: int) -> Workload:
    """Replay ``params.path`` (see the module docstring). Raises ConfigError for a bad trace or flags."""
    if params.speed <= 0:
        raise ConfigError("--speed", f"must be > 0, got {params.speed}")
    limit = min(params.max_input_tokens or max_prompt_tokens, max_prompt_tokens)
    if limit < 1 or params.block_tokens < 1:
        raise ConfigError("--max-input-tokens", "must leave room for at least one token")
    chunk_tokens = kvtier_chunk_tokens(params.block_tokens)
    records = read_trace(params.path, params.max_requests)
    start_ms = min(record.timestamp_ms for record in records)
    prompts = [prompt_token_ids(record, params.block_tokens, limit, id_range) for record in records]
    num_traced = sum(scaled_input_tokens(record, params.block_tokens) for record in records)
    kept_share = sum(len(prompt) for prompt in prompts) / num_traced
    if kept_share < 1 and params.max_input_tokens is None:
        longest = max(scaled_input_tokens(record, params.block_tokens) for record in records)
        raise ConfigError("--max-input-tokens", f"the trace's prompts reach {longest:,} tokens (at --block-tokens "
                                                f"{params.block_tokens}), beyond the {limit:,} a prompt may have here; "
                                                f"pass --max-input-tokens {limit} to cut them (keeps "
                                                f"{kept_share * 100:.1f}% of the trace's input tokens) or a smaller "
                                                f"--block-tokens (lengths scale with it)")
    requests = tuple(
        BenchRequest(index, (record.timestamp_ms - start_ms) / 1000.0 / params.speed, None, 1, TokenPrompt(prompt),
                     max(1, min(record.output_length, params.max_tokens)))
        for index, (record, prompt) in enumerate(zip(records, prompts)))
    parameters = {"path": params.path, "speed": params.speed, "block_tokens": params.block_tokens,
                  "max_input_tokens": limit, "max_tokens": params.max_tokens, "num_requests": len(records),
                  "input_tokens_kept": f"{kept_share * 100:.1f}%",
                  "kvtier_chunk_tokens": chunk_tokens or KVTIER_CHUNK_TOKENS}
    return Workload("trace", requests, parameter_items(parameters), has_rounds=False)


def make_sample_trace(num_requests: int, seed: int) -> list[dict[str, object]]:
    """A small synthetic trace in the Mooncake format: a few conversations whose requests extend a
    shared prefix (system prompt, then the conversation's history) plus one-off requests. Hash ids
    are small consecutive integers, as in the public traces."""
    rng = random.Random(seed)
    next_id = 0

    def new_ids(count: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + count))
        next_id += count
        return ids

    system = new_ids(2)
    conversations: list[list[int]] = [list(system) for _ in range(3)]
    lines, now_ms = [], 0
    for _ in range(num_requests):
        now_ms += rng.randint(50, 400)
        if rng.random() < 0.75:
            history = rng.choice(conversations)
            history.extend(new_ids(rng.randint(1, 2)))
            hash_ids = list(history)
        else:
            hash_ids = new_ids(rng.randint(1, 3))
        input_length = (len(hash_ids) - 1) * TRACE_BLOCK_TOKENS + rng.randint(1, TRACE_BLOCK_TOKENS)
        lines.append({"timestamp": now_ms, "input_length": input_length,
                      "output_length": rng.randint(8, 64), "hash_ids": hash_ids})
    return lines
