"""Worker side of the vLLM connector: executes each step's ``StepPlan`` on the engine's tensors.

Runs in vLLM's Worker process (one per tensor-parallel rank). It decides nothing: the scheduler side
chose every slot, block and key. Loads from memory are queued before the forward (``start_load_kv``:
a host-memory copy); on CUDA, where vLLM calls the per-layer hooks, layer group by layer group
(``kvtier.layerload``), so the forward waits in ``wait_for_layer_load`` for its layer's group
only, else as a whole before the forward; loads that need disk or remote reads are handed to the
transfer executor (``kvtier.transfers``), which reads on background threads, and are copied into
the engine's blocks on this thread once settled (``finished_loads``, from ``get_finished``).
Stores run after the forward (``wait_for_save``); disk writes and uploads go through bounded
background queues. No disk or network I/O ever runs on the engine's thread. Results go back in a
``WorkerReport``.

Each rank reads and writes its own shard of a chunk (``EngineSetup.shard_of``), except where every
rank holds the same KV (MLA): there rank 0 writes, deletes and uploads the chunk's one shard, every
rank reads it, and the other ranks acknowledge each write at once (it commits when rank 0's lands).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from collections.abc import Mapping

import torch

from kvtier.crypto import Sealer
from kvtier.datapath import ChunkMover, HostPool, PagedKV, ordered_layers
from kvtier.groupmover import GroupedMover
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.integrations.vllm.worker_loads import WorkerLoads
from kvtier.layerload import LayeredLoads
from kvtier.plans import EntryRef, Invalidation, LoadOp, SlotOp, StepPlan, StoreOp, WorkerReport
from kvtier.tiers.disk import DiskFiles, DiskWriter
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.uploader import RemoteUploader
from kvtier.transfers import FillExecutor

logger = logging.getLogger("kvtier")


@dataclass
class _PendingStep:
    """What one step left for after its store copies (``event`` None: done or none): its disk
    deletes, then its write-throughs and uploads. Steps finish in order, so a delete is queued
    behind every write of an earlier step and ahead of every write of a later one."""

    event: "torch.cuda.Event | None"
    stores: list[StoreOp]
    write_through: list[SlotOp]
    remote_puts: list[SlotOp]
    deletes: list[EntryRef]
    purges: list[str]
    invalidations: list[Invalidation]
    started: float


def _slot_bytes(pool: HostPool | None, slot: int) -> bytes:
    """A copy of a slot for the background writers: the slot may be reused right after."""
    assert pool is not None
    return bytes(pool.memoryview(slot))


class WorkerSide:
    def __init__(self, setup: EngineSetup, rank: int, remote: RemoteTier | None, sealer: Sealer | None,
                 upload_remote: RemoteTier | None = None) -> None:
        """``remote`` serves reads; ``upload_remote`` (another handle on the same tier, default
        ``remote``) serves uploads, so that failing writes leave reads healthy."""
        self.setup = setup
        self.rank = rank
        self.shard = setup.shard_of(rank)  # the shard this rank reads (and writes, if writes_shard)
        self.writes_shard = setup.writes_shard(rank)
        self._acked_writes: list[bytes] = []  # disk writes acknowledged without writing (another rank's shard)
        self.remote = remote
        self.upload_remote = upload_remote or remote
        self.uploader: RemoteUploader | None = None
        self._step_started: float | None = None
        self._pending: list[_PendingStep] = []  # steps with work left, oldest first
        self._awaiting_free: set[str] = set()
        if remote is not None and self.writes_shard:
            self.uploader = RemoteUploader(self.upload_remote, setup.layout.fingerprint(),
                                           setup.config.remote.queue_depth)
        self.report = WorkerReport()
        self._wire_reported = (0, 0)  # the remote tier's value bytes (read, written) reported so far
        self._queues_reported = (0, 0)  # the lengths of the disk write and upload queues reported so far
        self.paged: PagedKV | None = None
        self.pool: HostPool | None = None
        self.mover: ChunkMover | GroupedMover | None = None
        self.layered: LayeredLoads | None = None  # CUDA, exact slots: memory loads pipelined by layer
        self._layer_index = {name: index for index, name in enumerate(setup.layer_names)}
        self.disk: DiskFiles | None = None
        self.writer: DiskWriter | None = None
        self.fills: FillExecutor | None = None
        self.loads: WorkerLoads | None = None  # asynchronous loads (disk / remote reads), once registered
        self._queued_early: StepPlan | None = None  # a plan with nothing to copy, queued when bound
        if setup.disk_dir is not None:
            self.disk = DiskFiles(setup.disk_dir, setup.layout.fingerprint(), sealer=sealer)
            self.writer = DiskWriter(self.disk, setup.config.disk.queue_depth)

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> None:
        """Check the engine's KV tensors (from ``backend``, vLLM's attention backend name) against
        the expected layout and allocate the memory tier; ``LayoutError`` when they do not match."""
        layers = ordered_layers(kv_caches, self.setup.layer_names)
        self.paged = PagedKV(layers, self.setup.layout, backend)
        pin = self.paged.device.type == "cuda"
        self.pool = HostPool(self.setup.num_slots, self.setup.chunk_bytes, pin_memory=pin)
        if self.setup.groups is not None:  # several KV cache groups: synchronous, group by group
            self.mover = GroupedMover([PagedKV(ordered_layers(kv_caches, group.layer_names),
                                               replace(self.setup.layout, num_layers=len(group.layer_names)), backend)
                                       for group in self.setup.groups.groups], self.pool, self.setup.blocks_per_chunk)
        else:
            self.mover = ChunkMover(self.paged, self.pool, self.setup.blocks_per_chunk)
        groups = self.setup.config.memory.load_layer_groups
        if self.mover.ring is not None and pin and groups > 1 and self.setup.layout.kv_format == "exact":
            self.layered = LayeredLoads(self.paged, self.pool, self.mover.ring, self.setup.blocks_per_chunk, groups)
        self.fills = FillExecutor(self.pool.memoryview, self.shard, self.setup.layout.fingerprint(), self.disk,
                                  self.remote)
        self.loads = WorkerLoads(self.setup, self.fills, self._load, self.mover.last_load_event,
                                 whole_on_failure=self.setup.groups is not None)
        logger.info("kvtier: %d memory slots of %d bytes, disk %s, KV cache groups %s", self.setup.num_slots,
                    self.setup.chunk_bytes, self.setup.disk_dir or "off",
                    "one" if self.setup.groups is None else self.setup.groups.describe())

    # ----- before the forward ----------------------------------------------------------------
    def begin_step(self, plan: StepPlan) -> None:
        """Called when vLLM binds a step's plan, on every step (also those without a forward,
        where some versions skip ``wait_for_save``): takes the plan's delayed frees."""
        self._step_started = time.perf_counter()
        self._awaiting_free.update(plan.delayed_frees)
        if not plan.stores and (plan.deletes or plan.purges or plan.invalidations):
            self._queue_step(plan)  # nothing to copy: do not wait for a forward (0.26 skips wait_for_save)
            self._queued_early = plan
            self._poll()

    def start_load(self, plan: StepPlan, layer_hooks: bool = False) -> None:
        """Queue the plan's loads before the forward. ``layer_hooks``: vLLM will call
        ``wait_layer`` before each layer's attention in this forward (``compat.layer_hooks_run``),
        so memory loads may be pipelined by layer."""
        if plan.is_empty():
            return
        for op in plan.spills:
            if self._acknowledged_without_writing(op):
                continue
            self._submit_disk_write(op, _slot_bytes(self.pool, op.slot))
        assert self.fills is not None and self.mover is not None
        if plan.async_loads:
            self.mover.wait_loads()  # a fill may reuse a slot that a queued load still reads
            if self.layered is not None:
                self.layered.wait()
        assert self.loads is not None
        self.loads.submit(plan.async_loads)  # after the spills: a fill may reuse a spilled slot
        if plan.loads:
            self.report.copied_tokens += self._load(plan.loads, layered=layer_hooks and self.layered is not None)

    def wait_layer(self, layer_name: str) -> None:
        """Before ``layer_name``'s attention runs (vLLM's per-layer hook): order the engine's
        stream after the copies of its layer group."""
        if self.layered is not None and self.layered.pending:
            index = self._layer_index.get(layer_name)
            if index is None:
                self.layered.fence_all()  # a layer kvtier does not know: wait for everything
            else:
                self.layered.wait_layer(index)

    def _load(self, loads: list[LoadOp], layered: bool = False) -> int:
        """Copy ``loads`` into the engine's blocks; the number of tokens copied. ``layered``:
        queued layer group by layer group, each waited for in ``wait_layer``; else ordered before
        any later work on the engine's stream."""
        assert self.mover is not None
        started, cpu_started = time.perf_counter(), time.thread_time()
        if layered:
            assert self.layered is not None
            self.layered.scatter(loads)
        else:
            self.mover.scatter_chunks(loads)  # ordered before the forward on the engine's stream
        num_blocks = sum(len(op.block_ids) for op in loads)
        if self.setup.groups is None:
            self.report.memory_read_bytes += num_blocks * self.setup.chunk_bytes // self.setup.blocks_per_chunk
        else:  # the blocks of each group's runs: a sliding window's are fewer
            groups = self.setup.groups.groups
            num_pages = sum(len(run.block_ids) * len(group.layer_names) for op in loads
                            for run, group in zip(op.groups, groups))
            self.report.memory_read_bytes += num_pages * self.setup.layout.slot_page_bytes
        self.report.load_seconds.append(time.perf_counter() - started)
        self.report.load_cpu_seconds.append(time.thread_time() - cpu_started)
        return num_blocks * self.setup.layout.block_size

    def finished_loads(self) -> set[str]:
        """Requests whose asynchronous loads settled since the last call (``WorkerLoads.finished``)."""
        return set() if self.loads is None else self.loads.finished(self.report)

    def take_load_errors(self) -> set[int]:
        """Engine blocks that settled loads could not fill (one KV cache group)."""
        return set() if self.loads is None else self.loads.take_errors()

    def take_failed_loads(self) -> set[str]:
        """Requests whose whole load failed (several KV cache groups: recomputed from the start)."""
        return set() if self.loads is None else self.loads.take_failed()

    # ----- after the forward -----------------------------------------------------------------
    def save(self, plan: StepPlan) -> None:
        if self.layered is not None and self.layered.pending:  # a hook vLLM skipped: order what follows
            logger.warning("kvtier: vLLM skipped the per-layer hook of a pipelined load; set "
                           "memory.load_layer_groups: 1 if this repeats")
            self.layered.fence_all()
        if self._step_started is not None:
            self.report.forward_seconds = time.perf_counter() - self._step_started
            self._step_started = None
        if plan is not self._queued_early and (plan.stores or plan.deletes or plan.purges or plan.invalidations):
            self._queue_step(plan)
        self._poll()

    def _queue_step(self, plan: StepPlan) -> None:
        """Queue the store copies and return: on CUDA they overlap the next forward. Write-through
        and uploads read the slots, so they wait in ``_pending`` until the copies are done; the
        step's disk deletes wait there too, to keep their order with the writes."""
        assert self.mover is not None
        started = time.perf_counter()
        event = None
        if plan.stores:
            self.mover.gather_chunks(plan.stores)
            event = self.mover.mark_stores()
            self.report.memory_written_bytes += len(plan.stores) * self.setup.chunk_bytes
        self._pending.append(_PendingStep(event, plan.stores, plan.write_through, plan.remote_puts, plan.deletes,
                                          plan.purges, plan.invalidations, started))

    def _poll(self) -> None:
        """Finish the steps whose copies are done, oldest first (they complete in order)."""
        while self._pending and (self._pending[0].event is None or self._pending[0].event.query()):
            done = self._pending.pop(0)
            if self.writer is not None and self.writes_shard:
                for ref in done.deletes:
                    self.writer.submit_delete(ref.key, self.shard, namespace=ref.namespace)
                for namespace in done.purges:
                    self.writer.submit_purge(namespace)
            if self.uploader is not None:  # before this step's own uploads, which are newer
                for invalidation in done.invalidations:
                    self.uploader.remove(invalidation.namespace, invalidation.keys, self.shard)
            if done.stores:
                self.report.stored.extend(op.key for op in done.stores)
                self.report.store_seconds.append(time.perf_counter() - done.started)
            for op in done.write_through:  # straight from the slot: the store keeps it until written
                assert self.pool is not None
                if self._acknowledged_without_writing(op):
                    continue
                self._submit_disk_write(op, self.pool.memoryview(op.slot))
            for op in done.remote_puts:
                if self.uploader is not None:  # None on a rank that does not write its shard (MLA)
                    self._submit_upload(op, _slot_bytes(self.pool, op.slot))

    def handle_preemptions(self, plan: StepPlan) -> None:
        """Called on every step (vLLM 0.26 calls it whether or not anything was preempted): wait
        for the queued stores only when one of them reads a preempted request's blocks, which
        vLLM frees. Waiting on every step would hold each step behind the last one's copies."""
        preempted = set(plan.preempted)
        if preempted and any(op.req_id in preempted for pending in self._pending for op in pending.stores):
            self.drain()

    def drain(self) -> None:
        """Block until every queued copy is done, then finish them."""
        if self.mover is not None:
            self.mover.wait()
        self._poll()

    def finished_frees(self) -> set[str]:
        """Finished requests whose blocks vLLM kept for our stores and whose stores are done."""
        self._poll()
        busy = {op.req_id for pending in self._pending for op in pending.stores}
        done = {req_id for req_id in self._awaiting_free if req_id not in busy}
        self._awaiting_free -= done
        return done

    def _acknowledged_without_writing(self, op: SlotOp) -> bool:
        """On a rank that does not write its shard (MLA: rank 0 writes the one copy), acknowledge
        the disk write of ``op`` as done and return True; elsewhere False."""
        if self.writer is None or self.writes_shard:
            return False
        self._acked_writes.append(op.key)
        return True

    def _submit_disk_write(self, op: SlotOp, payload: bytes | memoryview) -> None:
        if self.writer is None:
            return
        if not self.writer.submit_write(op.key, self.shard, payload, namespace=op.namespace):
            self.report.num_dropped_writes += 1
            self.report.disk_failed.append(op.key)

    def _submit_upload(self, op: SlotOp, payload: bytes) -> None:
        assert self.uploader is not None
        if not self.uploader.submit(op.key, self.shard, payload, namespace=op.namespace, ttl_s=op.ttl_s):
            self.report.num_remote_dropped += 1
            self.report.remote_failed.append(op.key)

    # ----- reporting -------------------------------------------------------------------------
    def take_report(self) -> WorkerReport | None:
        self._poll()
        if self.loads is not None:
            self.loads.collect_fills(self.report)
        if self.writer is not None:
            written, failed = self.writer.take_results()
            self.report.disk_written.extend(written)
            self.report.disk_failed.extend(failed)
            self.report.num_disk_write_errors += len(failed)
            self.report.disk_written_bytes += len(written) * self.setup.chunk_bytes
            self.report.disk_written.extend(self._acked_writes)  # acknowledged, not written: no bytes
            self._acked_writes = []
        if self.uploader is not None:
            uploaded, failed = self.uploader.take_results()
            self.report.remote_written_bytes += len(uploaded) * self.setup.chunk_bytes
            self.report.remote_failed.extend(failed)
            self.report.num_remote_errors += len(failed)
        if self.remote is not None:
            assert self.upload_remote is not None
            wire = (self.remote.value_bytes_read, self.upload_remote.value_bytes_written)
            self.report.remote_wire_read_bytes += wire[0] - self._wire_reported[0]
            self.report.remote_wire_written_bytes += wire[1] - self._wire_reported[1]
            self._wire_reported = wire
        # the change in the lengths of the background queues
        queues = (0 if self.writer is None else self.writer.num_queued_writes,
                  0 if self.uploader is None else self.uploader.num_queued_uploads)
        self.report.disk_queue_delta += queues[0] - self._queues_reported[0]
        self.report.upload_queue_delta += queues[1] - self._queues_reported[1]
        self._queues_reported = queues
        report, self.report = self.report, WorkerReport()
        return None if report.is_empty() else report

    def shutdown(self) -> None:
        self.drain()
        if self.fills is not None:
            self.fills.close()
        if self.writer is not None:
            self.writer.close()
        if self.uploader is not None:
            self.uploader.close()
        if self.remote is not None:
            self.remote.close()
        if self.upload_remote is not None and self.upload_remote is not self.remote:
            self.upload_remote.close()

