"""``WorkerLoads``: the worker side's asynchronous loads, from submission to vLLM's report.

Runs on vLLM's engine thread in the Worker process, owned by ``WorkerSide``. A load whose chunks
need disk or remote reads is handed to the transfer executor (``kvtier.transfers``), which reads
into memory slots on background threads; once the reads settled, the chunks up to the first one
that was not verified are copied into the engine's blocks (through ``copy``, the worker's data
path) and the blocks of that chunk and of every chunk after it become load errors, which vLLM
recomputes. With several KV cache groups (``whole_on_failure``) block ids are unique within a
group only, so vLLM takes failures by request: a load that fails part-way copies nothing and the
request is reported failed (``take_failed``), which vLLM recomputes from its start. Nothing here
blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.plans import AsyncLoad, LoadOp, WorkerReport
from kvtier.tiers.contract import ReadResult
from kvtier.transfers import FillExecutor

logger = logging.getLogger("kvtier")

CopyLoads = Callable[[list[LoadOp]], int]  # copies loads into the engine's blocks: the tokens copied
LastCopy = Callable[[], "torch.cuda.Event | None"]  # completes with the last copies queued (None: done)


@dataclass
class _Copying:
    """A settled asynchronous load whose copy into the engine's blocks is queued (``event``
    completes when it is done; None: nothing to copy, or done)."""

    event: "torch.cuda.Event | None"
    req_id: str
    failed_blocks: set[int]
    failed: bool = False  # the whole load failed (several KV cache groups)


class WorkerLoads:
    """Pending and finished asynchronous loads, by request; see the module docstring."""

    def __init__(self, setup: EngineSetup, fills: FillExecutor, copy: CopyLoads, last_copy: LastCopy,
                 whole_on_failure: bool = False) -> None:
        self._setup = setup
        self._fills = fills
        self._copy = copy
        self._last_copy = last_copy
        self._whole_on_failure = whole_on_failure
        self._pending: dict[str, AsyncLoad] = {}  # by request, until settled
        self._copying: list[_Copying] = []  # settled, their copies into the blocks still queued
        self._errors: set[int] = set()  # engine blocks that async loads could not fill
        self._failed: set[str] = set()  # requests whose whole load failed (whole_on_failure)

    @property
    def pending(self) -> bool:
        """Loads submitted and not yet settled."""
        return bool(self._pending)

    def submit(self, loads: list[AsyncLoad]) -> None:
        """Hand ``loads``' reads to the transfer executor (the caller made sure no queued copy
        still reads a slot they fill)."""
        for load in loads:
            self._fills.submit(load.req_id, load.disk, load.remote, load.deadline_s)
            self._pending[load.req_id] = load

    def finished(self, report: WorkerReport) -> set[str]:
        """Requests whose loads settled since the last call: what was verified is now in their
        blocks; the rest are load errors (``take_errors``). Adds what was read to ``report``."""
        if not (self._pending or self._copying):
            return set()
        self.collect_fills(report)
        for settled in self._fills.take_settled():
            load = self._pending.pop(settled.job_id)
            filled = {op.slot for op in load.disk + load.remote}
            good = len(load.loads)
            for index, op in enumerate(load.loads):
                if op.slot in filled and op.slot not in settled.ok_slots:
                    good = index
                    break
            failed = self._whole_on_failure and good < len(load.loads)
            if failed:
                good = 0  # a chunk's groups load together, and vLLM takes a failure by request
            copied, loaded_tokens = None, 0
            if good:
                loaded_tokens = self._copy(list(load.loads[:good]))
                copied = self._last_copy()
            errors = set() if failed else {block for op in load.loads[good:] for block in op.block_ids}
            failed_tokens = sum(len(op.block_ids) for op in load.loads[good:]) * self._setup.layout.block_size
            report.settled_loads.append((load.req_id, loaded_tokens + failed_tokens, loaded_tokens))
            report.settled_tiers.append((load.req_id, self._tiers_of(load)))
            if settled.timed_out:
                logger.warning("kvtier: the load of request %s passed its deadline (%.1f s); the engine "
                               "recomputes %d of its chunks", load.req_id, load.deadline_s, len(load.loads) - good)
            self._copying.append(_Copying(copied, load.req_id, errors, failed))
        return self._copied()

    def take_errors(self) -> set[int]:
        """The engine blocks that loads reported finished could not fill, each once."""
        errors, self._errors = self._errors, set()
        return errors

    def take_failed(self) -> set[str]:
        """Requests reported finished whose whole load failed (``whole_on_failure``), each once."""
        failed, self._failed = self._failed, set()
        return failed

    def collect_fills(self, report: WorkerReport) -> None:
        """Report every background read that finished (each once), even after its deadline."""
        results, remote_seconds = self._fills.take_results()
        report.remote_fetch_seconds += remote_seconds
        for done in results:
            key = done.op.key
            if done.result is ReadResult.OK:
                report.promoted.append(key)
                if done.tier == "disk":
                    report.disk_read_bytes += self._setup.chunk_bytes
                else:
                    report.remote_read_bytes += self._setup.chunk_bytes
                continue
            report.promote_failed.append(key)
            if done.tier == "remote":
                report.remote_failed.append(key)
            if done.result in (ReadResult.CORRUPT, ReadResult.UNREADABLE):  # both counted as errors
                if done.tier == "disk":
                    report.num_corrupt += 1
                else:
                    report.num_remote_errors += 1
                logger.warning("kvtier: %s %s entry %s; the engine recomputes it", done.result.value, done.tier,
                               key.hex())

    def _copied(self) -> set[str]:
        """Requests whose verified chunks are in their blocks (their copies, queued on the GPU
        without waiting, completed); their failed blocks go to ``take_errors`` with them."""
        done: set[str] = set()
        waiting: list[_Copying] = []
        for copying in self._copying:
            if copying.event is None or copying.event.query():
                done.add(copying.req_id)
                self._errors |= copying.failed_blocks
                if copying.failed:
                    self._failed.add(copying.req_id)
            else:
                waiting.append(copying)
        self._copying = waiting
        return done

    def _tiers_of(self, load: AsyncLoad) -> tuple[tuple[str, int], ...]:
        """(tier, tokens) of each chunk of ``load``: disk or remote when a read fills its slot, else memory."""
        disk = {op.slot for op in load.disk}
        remote = {op.slot for op in load.remote}
        return tuple(("disk" if op.slot in disk else "remote" if op.slot in remote else "memory",
                      len(op.block_ids) * self._setup.layout.block_size) for op in load.loads)
