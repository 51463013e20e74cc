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

BlockId = tuple[int, int]  # (trie node, engine block within the node's segment)


class EnginePrefixCache:
    def __init__(self, num_blocks: int, block_tokens: int, segment_tokens: int) -> None:
        if num_blocks < 1:
            raise ConfigError("--engine-cache-tokens", "must hold at least one engine block")
        assert segment_tokens % block_tokens == 0, "the workload reader checks this"
        self._block_tokens = block_tokens
        self._per_segment = segment_tokens // block_tokens
        self._num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(num_blocks))
        self._hash_of: dict[int, BlockId] = {}
        self._copies: dict[BlockId, list[int]] = {}

    def run(self, request: SimRequest) -> int:
        """Serve ``request``: return the tokens found cached, then keep its blocks as vLLM does."""
        num_prompt_full = request.num_tokens // self._block_tokens
        num_total = -(-(request.num_tokens + request.num_output_tokens - 1) // self._block_tokens)
        if num_total > self._num_blocks:
            raise ConfigError("--engine-cache-tokens", f"{self._num_blocks * self._block_tokens} tokens cannot hold a "
                                                       f"request of {request.num_tokens + request.num_output_tokens}")
        ids = [self._block_id(request, index) for index in range(num_prompt_full)]
        max_hit = (request.num_tokens - 1) // self._block_tokens
        held: list[int] = []
        for block_id in ids[:max_hit]:
            copies = self._copies.get(block_id)
            if not copies:
                break
            held.append(copies[0])
            self._free.pop(copies[0], None)  # in use now
        num_hit = len(held)
        for index in range(num_hit, num_total):
            block = self._allocate()
            if index < num_prompt_full:
                self._cache(block, ids[index])
            held.append(block)
        for block in reversed(held):
            self._free[block] = None
        return num_hit * self._block_tokens

    def _block_id(self, request: SimRequest, index: int) -> BlockId:
        return request.nodes[index // self._per_segment], index % self._per_segment

    def _allocate(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self._hash_of.pop(block, None)
        if old is not None:
            copies = self._copies[old]
            copies.remove(block)
            if not copies:
                del self._copies[old]
        return block

    def _cache(self, block: int, block_id: BlockId) -> None:
        self._hash_of[block] = block_id
        self._copies.setdefault(block_id, []).append(block)


def engine_hits(requests: tuple[SimRequest, ...], cache_tokens: int, block_tokens: int,
                segment_tokens: int) -> list[int]:
    """Tokens the engine's own cache gives each request (all zero when ``cache_tokens`` is 0)."""
    if cache_tokens == 0:
        return [0] * len(requests)
    cache = EnginePrefixCache(cache_tokens // block_tokens, block_tokens, segment_tokens)
    return [cache.run(request) for request in requests]
