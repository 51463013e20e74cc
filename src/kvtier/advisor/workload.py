"""The advisor's input: a trace read into requests that carry kvtier's real chunk keys.

Two formats, told apart by the first record's fields:
- Mooncake JSONL (``timestamp``, ``input_length``, ``output_length``, ``hash_ids``): each hash id
  names one block of ``block_tokens`` tokens (lengths scale as in ``kvtier bench trace``);
- prompts JSONL (``token_ids``, or ``prompt`` text with a tokenizer; optional ``timestamp`` in ms
  and ``output_length``).

A request's prompt is a list of *segments* of ``segment_tokens`` tokens (a trace block, or for
token prompts an engine block). Segments are interned in a trie (parent, content) -> node id, so two
requests share node ids exactly where their prompts share a prefix of whole segments. Each node
computes, once, the chunk keys (``kvtier.keys.chunk_keys``, the function the vLLM connector uses)
of the full chunks that end inside it, continuing its parent's chain. The token content of a hash
id's block is a pure function of the id (its two 32-bit halves, then 2, 3, ...): distinct ids give
distinct keys, equal prefixes equal keys, without generating random tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from kvtier.bench.trace import TRACE_BLOCK_TOKENS, parse_record
from kvtier.errors import ConfigError
from kvtier.keys import Namespace, chunk_keys

_NAMESPACE = Namespace("advisor", "trace", b"advisor").digest()
Encode = Callable[[str], list[int]]  # text -> token ids
_MASK_32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float  # after the first request
    num_tokens: int  # prompt tokens
    num_output_tokens: int
    nodes: tuple[int, ...]  # trie node of each segment the prompt touches (the last may be partial)
    chunk_keys: tuple[bytes, ...]  # keys of the prompt's full chunks, in order


@dataclass(frozen=True)
class Workload:
    path: str
    format: str  # "mooncake" or "prompts"
    segment_tokens: int
    chunk_tokens: int
    requests: tuple[SimRequest, ...]

    @property
    def num_tokens(self) -> int:
        return sum(request.num_tokens for request in self.requests)


@dataclass(frozen=True)
class _Node:
    keys: tuple[bytes, ...]  # chunk keys ending in this node (as if the segment were whole)
    tail: tuple[int, ...]  # tokens after the last chunk boundary, up to the node's end
    last_key: bytes | None  # the chain's last key up to this node


class _Trie:
    """Segments interned by (parent node, content); node 0 is the empty prefix."""

    def __init__(self, chunk_tokens: int) -> None:
        self._chunk_tokens = chunk_tokens
        self._ids: dict[tuple[int, Hashable], int] = {}
        self._nodes: list[_Node] = [_Node((), (), None)]

    def child(self, parent: int, content: Hashable, tokens: Callable[[], Sequence[int]]) -> int:
        """The node of segment ``content`` after ``parent``; ``tokens`` makes the segment's tokens,
        called only for a new node (a trace repeats most of its segments)."""
        node_id = self._ids.get((parent, content))
        if node_id is None:
            node_id = self._ids[(parent, content)] = len(self._nodes)
            self._nodes.append(self._extend(self._nodes[parent], tokens()))
        return node_id

    def _extend(self, parent: _Node, tokens: Sequence[int]) -> _Node:
        pending = [*parent.tail, *tokens]
        keys = tuple(key.digest for key in chunk_keys(_NAMESPACE, pending, self._chunk_tokens, parent=parent.last_key))
        return _Node(keys, tuple(pending[len(keys) * self._chunk_tokens:]), keys[-1] if keys else parent.last_key)

    def keys_of(self, nodes: Sequence[int], num_tokens: int) -> tuple[bytes, ...]:
        """The keys of the full chunks within the first ``num_tokens`` tokens along ``nodes``."""
        num_chunks = num_tokens // self._chunk_tokens
        keys: list[bytes] = []
        for node_id in nodes:
            keys.extend(self._nodes[node_id].keys)
        return tuple(keys[:num_chunks])


def block_tokens_of(hash_id: int, block_tokens: int) -> list[int]:
    """The tokens of the block a hash id names: a pure function of the id."""
    head = [hash_id & _MASK_32, (hash_id >> 32) & _MASK_32]
    return (head + list(range(2, block_tokens)))[:block_tokens]


def read_workload(path: str, block_tokens: int, chunk_tokens: int, engine_block_tokens: int,
                  max_requests: int | None, encode: Encode | None = None) -> Workload:
    """Read ``path`` (see the module docstring); ``encode`` tokenizes ``prompt`` texts. Raises
    ConfigError naming the file and line for a missing or garbled file, and the flag for sizes that
    do not fit together."""
    if chunk_tokens % engine_block_tokens:
        raise ConfigError("--chunk-tokens", f"{chunk_tokens} is not a multiple of --engine-block-tokens "
                                            f"{engine_block_tokens} (kvtier refuses this at start-up too)")
    lines = _read_lines(path, max_requests)
    first = _json(lines[0][1], f"{path}:{lines[0][0]}")
    trie = _Trie(chunk_tokens)
    if "hash_ids" in first:
        if block_tokens % engine_block_tokens:
            raise ConfigError("--block-tokens", f"{block_tokens} is not a multiple of --engine-block-tokens "
                                                f"{engine_block_tokens}")
        requests = _mooncake(path, lines, block_tokens, trie)
        return Workload(path, "mooncake", block_tokens, chunk_tokens, requests)
    if "token_ids" in first or "prompt" in first:
        if "token_ids" not in first and encode is None:
            raise ConfigError("--tokenizer", f"{path} holds prompt texts: name a folder with tokenizer.json")
        return Workload(path, "prompts", engine_block_tokens, chunk_tokens,
                        _prompts(path, lines, engine_block_tokens, trie, encode))
    raise ConfigError(f"{path}:{lines[0][0]}", "neither a Mooncake record (hash_ids, input_length, ...) nor a "
                                                "prompt (token_ids or prompt)")


def _read_lines(path: str, max_requests: int | None) -> list[tuple[int, str]]:
    try:
        with open(path) as file:
            lines = []
            for number, line in enumerate(file, start=1):
                if line.strip():
                    lines.append((number, line))
                if max_requests is not None and len(lines) >= max_requests:
                    break
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("TRACE", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not lines:
        raise ConfigError(path, "the trace holds no record")
    return lines


def _json(line: str, where: str) -> dict[str, object]:
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise ConfigError(where, f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected a JSON object per line")
    return raw


def _mooncake(path: str, lines: list[tuple[int, str]], block_tokens: int, trie: _Trie) -> tuple[SimRequest, ...]:
    records = [parse_record(line, f"{path}:{number}") for number, line in lines]
    start_ms = min(record.timestamp_ms for record in records)
    requests = []
    for record in records:
        num_tokens = math.ceil(record.input_length * block_tokens / TRACE_BLOCK_TOKENS)
        nodes, parent = [], 0
        for hash_id in record.hash_ids[:math.ceil(num_tokens / block_tokens)]:
            parent = trie.child(parent, hash_id, lambda: block_tokens_of(hash_id, block_tokens))
            nodes.append(parent)
        requests.append(SimRequest((record.timestamp_ms - start_ms) / 1000.0, num_tokens, record.output_length,
                                   tuple(nodes), trie.keys_of(nodes, num_tokens)))
    return tuple(requests)


def _prompts(path: str, lines: list[tuple[int, str]], segment_tokens: int, trie: _Trie,
             encode: Encode | None) -> tuple[SimRequest, ...]:
    requests = []
    start_ms: float | None = None
    for number, line in lines:
        where = f"{path}:{number}"
        raw = _json(line, where)
        try:
            tokens = _prompt_tokens(raw, encode)
            timestamp_ms = float(str(raw.get("timestamp", 0.0)))
            num_output = int(str(raw.get("output_length", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(where, f"not a prompt record (token_ids or prompt, optional timestamp, "
                                     f"output_length): {exc!r}") from None
        if not tokens or min(tokens) < 0 or max(tokens) > _MASK_32:
            raise ConfigError(where, "token_ids must be a non-empty list of ids in 0..2**32-1")
        start_ms = timestamp_ms if start_ms is None else start_ms
        nodes, parent = [], 0
        for offset in range(0, len(tokens), segment_tokens):
            segment = tuple(tokens[offset:offset + segment_tokens])
            parent = trie.child(parent, segment, lambda: segment)
            nodes.append(parent)
        requests.append(SimRequest(max(0.0, (timestamp_ms - start_ms) / 1000.0), len(tokens), max(1, num_output),
                                   tuple(nodes), trie.keys_of(nodes, len(tokens))))
    return tuple(requests)


def _prompt_tokens(raw: dict[str, object], encode: Encode | None) -> list[int]:
    """The record's token ids: ``token_ids`` as given, else its ``prompt`` text tokenized."""
    if "token_ids" in raw:
        ids = raw["token_ids"]
        if not isinstance(ids, list):
            raise TypeError("token_ids is not a list")
        return [int(token) for token in ids]
    text = raw["prompt"]
    if not isinstance(text, str) or encode is None:
        raise TypeError("prompt is not a text (or no --tokenizer)")
    return encode(text)


def tokenizer_encode(folder: str) -> Encode:
    """Token ids of a text with ``folder``/tokenizer.json (no special tokens added). Raises ConfigError."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
    except Exception as exc:  # tokenizers raises its own exception type for missing and garbled files
        raise ConfigError("--tokenizer", f"cannot load {folder}/tokenizer.json: {exc}") from None
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False).ids)
