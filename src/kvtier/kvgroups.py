"""KV cache groups (vLLM's hybrid KV cache manager): which blocks of a chunk each group stores and loads.

Pure planning on numbers: no torch, no vLLM. A model with sliding-window and full-attention layers
(Gemma 3, gpt-oss) has one KV cache group per kind of layer when vLLM's hybrid allocator is on;
every group has its own block table, and block ids are unique across groups (one block pool).

A slot holds one chunk of every group as the groups are laid out, group after group, each
[layers of the group, blocks of the chunk, page] (all groups share one page shape), so a chunk has
one key and one entry on every tier. What moves:
- a full-attention group: every block of the chunk, stored and loaded;
- a sliding-window group: stored, only the blocks its window still needs at the chunk's end; loaded,
  only the blocks its window needs at the end of the load. "Needs" is vLLM's own rule
  (``SlidingWindowManager.get_num_skipped_tokens``): after ``n`` computed tokens the tokens before
  ``n - window + 1`` are skipped, and so are the blocks wholly before that token. vLLM gives those
  positions its null block (``NULL_BLOCK_ID``), so they are never read or written.
A load that ends inside a chunk could need sliding-window blocks that the chunk did not store (they
were outside the window at the chunk's end): ``load_end`` then ends the load at the chunk's start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.errors import LayoutError
from kvtier.plans import BlockRun

NULL_BLOCK_ID = 0  # vLLM's null block (BlockPool.null_block), in the place of skipped blocks


@dataclass(frozen=True)
class KVGroup:
    """One KV cache group: its layers (in the engine's order) and, for sliding-window layers, the
    window in tokens (vLLM's ``SlidingWindowSpec.sliding_window``; None: full attention)."""

    layer_names: tuple[str, ...]
    sliding_window: int | None = None

    def first_needed_block(self, num_computed_tokens: int, block_size: int) -> int:
        """The first block this group still needs after ``num_computed_tokens`` tokens: vLLM's
        skipped tokens (``num_computed_tokens - window + 1``, at least 0) in whole blocks."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - self.sliding_window + 1) // block_size

    def describe(self) -> str:
        """The group's part of the layout fingerprint: kind and number of layers."""
        kind = "full" if self.sliding_window is None else f"sliding_window:{self.sliding_window}"
        return f"{kind}x{len(self.layer_names)}"


class GroupPlan:
    """The KV cache groups of one engine and the block runs each chunk stores and loads."""

    def __init__(self, groups: Sequence[KVGroup], block_size: int, blocks_per_chunk: int) -> None:
        if not groups:
            raise LayoutError("the engine has no KV cache group")
        full = [index for index, group in enumerate(groups) if group.sliding_window is None]
        if not full:
            windows = ", ".join(str(group.sliding_window) for group in groups)
            raise LayoutError(f"kvtier needs a full-attention KV cache group, this model has only sliding-window "
                              f"groups (windows {windows}): a prefix hit would restore no full-attention KV")
        for group in groups:
            if group.sliding_window is not None and group.sliding_window < 1:
                raise LayoutError(f"a sliding window must be at least one token, got {group.sliding_window}")
        self.groups = tuple(groups)
        self.block_size = block_size
        self.blocks_per_chunk = blocks_per_chunk
        self.full_index = full[0]  # the group whose run counts the tokens of a load

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Every layer, group after group: the layers' order in a slot."""
        return tuple(name for group in self.groups for name in group.layer_names)

    @property
    def chunk_tokens(self) -> int:
        return self.blocks_per_chunk * self.block_size

    def describe(self) -> str:
        return ";".join(group.describe() for group in self.groups)

    def store_runs(self, chunk_index: int, block_ids: Sequence[Sequence[int]],
                   num_processed: int) -> tuple[BlockRun, ...] | None:
        """The runs chunk ``chunk_index`` stores from a request's blocks (``block_ids``: one list
        per group, vLLM's block table); None when a block it needs is not there (not allocated,
        or vLLM's null block: skipped before kvtier saw it), or may be gone: vLLM frees a window's
        blocks on the tokens processed before the step (``num_processed``; the block table kvtier
        keeps does not see it), and a freed block may hold another request's KV by the time the
        step's store reads it (a chunk stored after the step that completed it: accepted draft
        tokens, decode tokens). Then the chunk is not stored."""
        first = chunk_index * self.blocks_per_chunk
        end = first + self.blocks_per_chunk
        runs: list[BlockRun] = []
        for group, ids in zip(self.groups, block_ids, strict=True):
            lo = max(first, group.first_needed_block(end * self.block_size, self.block_size))
            run = tuple(ids[lo:end])
            if len(run) != end - lo or NULL_BLOCK_ID in run or \
                    lo < group.first_needed_block(num_processed, self.block_size):
                return None
            runs.append(BlockRun(lo - first, run))
        return tuple(runs)

    def load_end(self, hit_tokens: int) -> int:
        """The longest load up to ``hit_tokens`` (block-aligned) whose blocks were all stored: the
        hit, or where its last chunk starts when that chunk did not keep a block the windows need
        at the hit's end."""
        chunk_tokens = self.chunk_tokens
        if hit_tokens % chunk_tokens == 0:
            return hit_tokens
        chunk_start = hit_tokens // chunk_tokens * chunk_tokens
        first = chunk_start // self.block_size
        hit_block = hit_tokens // self.block_size
        for group in self.groups:
            needed = max(first, group.first_needed_block(hit_tokens, self.block_size))
            stored = max(first, group.first_needed_block(chunk_start + chunk_tokens, self.block_size))
            if needed < min(stored, hit_block):
                return chunk_start
        return hit_tokens

    def chunk_load_runs(self, chunk_index: int, start_block: int, load_end_tokens: int,
                        block_ids: Sequence[Sequence[int]]) -> tuple[BlockRun, ...]:
        """The runs chunk ``chunk_index`` loads into a request's blocks (``block_ids``: one list per
        group) for a load of blocks ``start_block ..`` up to ``load_end_tokens`` (block-aligned,
        from ``load_end``): full attention every block of the chunk in that range, a sliding
        window only those its window needs at ``load_end_tokens``."""
        first = chunk_index * self.blocks_per_chunk
        end = min(first + self.blocks_per_chunk, load_end_tokens // self.block_size)
        runs: list[BlockRun] = []
        for group, ids in zip(self.groups, block_ids, strict=True):
            lo = max(first, start_block, group.first_needed_block(load_end_tokens, self.block_size))
            runs.append(BlockRun(lo - first, tuple(ids[lo:end])) if lo < end else BlockRun(0, ()))
        return tuple(runs)
