"""A model of the engine's own prefix cache (vLLM's block pool), one request at a time.

vLLM keeps ``num_blocks`` physical blocks of ``block_tokens`` tokens. A full block of a prompt is
cached under its prefix hash; a new request reuses the longest run of cached blocks from its start,
at most ``(num_tokens - 1) // block_tokens`` blocks (the last token is always computed). Free blocks
wait in one queue, oldest first; allocating takes the front block (dropping whatever it cached),
and a finished request gives its blocks back in reverse order (its tail is evicted before its
head). Blocks filled by decode tokens hold tokens no later prompt repeats: they take room, never
hit. A block recomputed although cached (the last-token rule) is a second copy of the same hash.

Requests run one after another (the advisor's replay is sequential), so this is exact for vLLM at
concurrency 1; with a large cache and concurrent requests it is close, since requests in flight
hold few blocks compared with the pool.
"""

from __future__ import annotations

from collections import OrderedDict

from kvtier.advisor.workload import SimRequest
from kvtier.errors import ConfigError

class EnginePrefixCache:
    """The block pool's books. A block's content is named by an int, ``node * blocks_per_segment +
    block within the segment``; ``_first`` maps a content to the physical block a hit uses (its oldest
    copy), ``_extra`` to its other copies (rare: a block recomputed under the last-token rule)."""

    def __init__(self, num_blocks: int, block_tokens: int, segment_tokens: int) -> None:
        if num_blocks < 1:
            raise ConfigError("--engine-cache-tokens", "must hold at least one engine block")
        assert segment_tokens % block_tokens == 0, "the workload reader checks this"
        self._block_tokens = block_tokens
        self._per_segment = segment_tokens // block_tokens
        self._num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(num_blocks))
        self._hash_of: dict[int, int] = {}  # physical block -> the content it caches
        self._first: dict[int, int] = {}  # content -> physical block (oldest copy)
        self._extra: dict[int, list[int]] = {}  # content -> later copies, oldest first

    def run(self, request: SimRequest) -> int:
        """Serve ``request``: return the tokens found cached, then keep its blocks as vLLM does."""
        block_tokens = self._block_tokens
        num_prompt_full = request.num_tokens // block_tokens
        num_total = -(-(request.num_tokens + request.num_output_tokens - 1) // block_tokens)
        if num_total > self._num_blocks:
            raise ConfigError("--engine-cache-tokens", f"{self._num_blocks * block_tokens} tokens cannot hold a "
                                                       f"request of {request.num_tokens + request.num_output_tokens}")
        ids = self._contents(request, num_prompt_full)
        free, first, hash_of = self._free, self._first, self._hash_of
        held: list[int] = []
        for content in ids[:(request.num_tokens - 1) // block_tokens]:
            block = first.get(content)
            if block is None:
                break
            held.append(block)
            free.pop(block, None)  # in use now
        num_hit = len(held)
        take, extra = free.popitem, self._extra
        for content in ids[num_hit:]:  # the prompt's full blocks after the hit: computed and cached
            block = take(False)[0]
            old = hash_of.pop(block, None)
            if old is not None:
                if old in extra:
                    self._forget(old, block)
                else:
                    del first[old]
            hash_of[block] = content
            if content in first:
                extra.setdefault(content, []).append(block)
            else:
                first[content] = block
            held.append(block)
        for _ in range(max(num_hit, num_prompt_full), num_total):  # the partial last block and decode blocks
            block = take(False)[0]
            old = hash_of.pop(block, None)
            if old is not None:
                if old in extra:
                    self._forget(old, block)
                else:
                    del first[old]
            held.append(block)
        held.reverse()
        free.update(dict.fromkeys(held))
        return num_hit * block_tokens

    def _contents(self, request: SimRequest, num_blocks: int) -> list[int]:
        per_segment = self._per_segment
        ids: list[int] = []
        for node in request.nodes:
            if len(ids) >= num_blocks:
                break
            ids.extend(range(node * per_segment, (node + 1) * per_segment))
        return ids[:num_blocks]

    def _forget(self, content: int, block: int) -> None:
        """``block`` no longer caches ``content`` (it was allocated again)."""
        extra = self._extra.get(content)
        if self._first[content] == block:
            if extra:
                self._first[content] = extra.pop(0)
            else:
                del self._first[content]
        else:
            assert extra is not None, "a block cached a content with no record of it"
            extra.remove(block)
        if extra is not None and not extra:
            del self._extra[content]


def engine_hits(requests: tuple[SimRequest, ...], cache_tokens: int, block_tokens: int,
                segment_tokens: int) -> list[int]:
    """Tokens the engine's own cache gives each request (all zero when ``cache_tokens`` is 0)."""
    if cache_tokens == 0:
        return [0] * len(requests)
    cache = EnginePrefixCache(cache_tokens // block_tokens, block_tokens, segment_tokens)
    return [cache.run(request) for request in requests]
