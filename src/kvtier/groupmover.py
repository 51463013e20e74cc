"""``GroupedMover``: the data path with several KV cache groups (vLLM's hybrid allocator on).

Executes store ops (engine blocks -> host slots) and load ops (slots -> blocks) whose ``groups``
name one block run per KV cache group (``kvtier.kvgroups``). A slot holds the groups one after the
other, each [layers of the group, blocks of the chunk, page]; a run moves only its own blocks, so a
sliding-window group's blocks outside its window are neither read nor written. Synchronous: every
call returns with its copies done (on CUDA through a temporary on the device and a blocking copy),
so the events ``ChunkMover`` offers are always None. Layer-pipelined loads stay with the one-group
``ChunkMover``. Called by the worker from the thread that runs the engine's forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.datapath import HostPool, PagedKV
from kvtier.errors import LayoutError
from kvtier.plans import BlockRun, LoadOp, StoreOp
from kvtier.staging import StagingRing


class GroupedMover:
    """Moves chunks of several KV cache groups between the engine's blocks and host slots; the
    calls ``ChunkMover`` offers the worker, all synchronous."""

    def __init__(self, groups: Sequence[PagedKV], pool: HostPool, blocks_per_chunk: int) -> None:
        self.groups = tuple(groups)
        self.pool = pool
        self.blocks_per_chunk = blocks_per_chunk
        self._offsets: list[int] = []  # where each group starts in a slot, in bytes
        offset = 0
        for paged in self.groups:
            self._offsets.append(offset)
            offset += paged.layout.num_layers * blocks_per_chunk * paged.layout.block_bytes_per_layer
        if offset > pool.slot_bytes:
            raise LayoutError(f"host slots of {pool.slot_bytes} bytes cannot hold a chunk of {offset} bytes "
                              f"in {len(self.groups)} KV cache groups")
        self._group_bytes = [next_offset - start for start, next_offset in
                             zip(self._offsets, [*self._offsets[1:], offset])]

    @property
    def ring(self) -> StagingRing | None:
        return None  # no staging: nothing to pipeline layer by layer

    def gather_chunks(self, ops: Sequence[StoreOp]) -> None:
        """Copy each op's runs of engine blocks into its memory slot, group by group. The rest of
        the slot (blocks outside a window, a group with no run, the tail) is zeroed: it held the
        slot's previous chunk, perhaps another tenant's, and the whole slot goes to disk, the
        remote and peers under this chunk's key."""
        for op in ops:
            self._zero_unwritten(op)
            for index, run in self._runs(op.groups):
                view = self._group_view(op.slot, index)
                target = view[:, run.first_block:run.first_block + len(run.block_ids)]
                paged = self.groups[index]
                if paged.device.type == "cpu":
                    paged.gather(run.block_ids, target)
                else:
                    staged = torch.empty(target.shape, dtype=target.dtype, device=paged.device)
                    paged.gather(run.block_ids, staged)
                    target.copy_(staged)  # blocking: the slot holds the blocks when this returns

    def scatter_chunks(self, ops: Sequence[LoadOp]) -> None:
        """Copy each op's runs of its slot into the engine's blocks, group by group."""
        for op in ops:
            for index, run in self._runs(op.groups):
                paged = self.groups[index]
                view = self._group_view(op.slot, index)
                if paged.device.type != "cpu":
                    view = view.to(paged.device)
                paged.scatter(view, run.first_block, run.block_ids)
                if paged.device.type != "cpu":
                    torch.cuda.current_stream(paged.device).synchronize()  # the slot may be reused next

    def last_load_event(self) -> "torch.cuda.Event | None":
        return None  # loads are done when scatter_chunks returns

    def mark_stores(self) -> "torch.cuda.Event | None":
        return None  # stores are done when gather_chunks returns

    def wait_loads(self) -> None:
        return None

    def wait(self) -> None:
        return None

    def _zero_unwritten(self, op: StoreOp) -> None:
        written = dict(self._runs(op.groups))
        for index in range(len(self.groups)):
            view = self._group_view(op.slot, index)
            run = written.get(index)
            if run is None:
                view.zero_()
                continue
            view[:, :run.first_block].zero_()
            view[:, run.first_block + len(run.block_ids):].zero_()
        end = self._offsets[-1] + self._group_bytes[-1]
        self.pool.slot(op.slot)[end:].zero_()

    def _runs(self, runs: Sequence[BlockRun]) -> list[tuple[int, BlockRun]]:
        if len(runs) != len(self.groups):
            raise ValueError(f"an op names {len(runs)} block runs, the engine has {len(self.groups)} KV cache groups")
        return [(index, run) for index, run in enumerate(runs) if run.block_ids]

    def _group_view(self, slot: int, index: int) -> torch.Tensor:
        """Group ``index``'s part of ``slot``: [layers, blocks, page] of KV-sized integer words."""
        start = self._offsets[index]
        data = self.pool.slot(slot)[start:start + self._group_bytes[index]]
        return self.groups[index].slot_view(data, self.blocks_per_chunk)
