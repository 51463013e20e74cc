"""The transfer executor: reads chunks from the disk and remote tiers into memory slots on
background threads, so that no engine step ever waits for disk or network I/O.

Engine-neutral and torch-free: a slot is a ``memoryview`` given by the caller, and copying slots
into the engine's own KV memory stays with the caller (on the engine's thread, after a fill is
settled), so the executor never touches engine memory.

Contract (``FillExecutor``):
- ``submit(job_id, disk_ops, remote_ops, deadline_s)`` is called from the engine's thread; it
  returns at once. Each job's disk reads run on one thread, which spreads the chunks over
  ``disk_readers`` reader threads (reads into the slots and checksums run in parallel, without
  the GIL); remote reads run on another thread, so a stalled remote never holds back a disk read.
- ``take_settled()`` (engine's thread) returns the jobs that are *settled*: every read finished,
  or ``deadline_s`` passed since ``submit``. A settled job names the slots that hold verified
  data (``ok_slots``); every other slot of the job must not be copied into the engine (a miss:
  the engine recomputes those tokens). This is what bounds a request's wait by wall-clock time,
  whatever the tier does.
- ``take_results()`` (engine's thread) returns each read once it has really finished (and the
  seconds the remote reads took), possibly
  after its job was settled by the deadline. A slot being read must not be reused until its
  result was taken: the books keep such an entry pending (not evictable) until then, so a late
  read can never land in a slot that holds something else.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.plans import SlotOp
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.remote import RemoteTier


@dataclass(frozen=True)
class SlotResult:
    """How one read into a memory slot ended."""

    op: SlotOp
    tier: str  # "disk" | "remote"
    result: ReadResult


@dataclass(frozen=True)
class SettledFill:
    """A job whose reads all finished, or whose deadline passed."""

    job_id: str
    ok_slots: frozenset[int]  # slots that hold verified data
    timed_out: bool


@dataclass(frozen=True)
class _Batch:
    """The reads of one tier for one job, and how long they took (seconds, once done)."""

    tier: str
    future: "concurrent.futures.Future[tuple[list[SlotResult], float]]"


@dataclass
class _Job:
    job_id: str
    deadline: float  # time.monotonic() after which the job is settled regardless
    batches: list[_Batch] = field(default_factory=list)  # whose results were not taken yet
    ok_slots: set[int] = field(default_factory=set)  # verified slots of the batches already taken
    settled: bool = False


class FillExecutor:
    """Background reads from disk and remote into memory slots; see the module docstring."""

    def __init__(self, slot_view: Callable[[int], memoryview], rank: int, layout_fingerprint: bytes,
                 disk: DiskFiles | None, remote: RemoteTier | None, disk_readers: int = 8) -> None:
        self._slot_view = slot_view
        self._rank = rank
        self._layout_fingerprint = layout_fingerprint
        self._disk = disk
        self._remote = remote
        self._threads = {tier: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kvtier-fill-{tier}",
                                                                 initializer=unbind_this_thread)
                         for tier in ("disk", "remote")}
        self._disk_readers = concurrent.futures.ThreadPoolExecutor(max(1, disk_readers),
                                                                   thread_name_prefix="kvtier-disk-read",
                                                                   initializer=unbind_this_thread)
        self._jobs: list[_Job] = []  # submitted, oldest first, until every batch's result was taken

    def submit(self, job_id: str, disk_ops: Sequence[SlotOp], remote_ops: Sequence[SlotOp], deadline_s: float) -> None:
        job = _Job(job_id, time.monotonic() + deadline_s)
        if disk_ops:
            job.batches.append(_Batch("disk", self._threads["disk"].submit(self._read_disk, list(disk_ops))))
        if remote_ops:
            job.batches.append(_Batch("remote", self._threads["remote"].submit(self._read_remote, list(remote_ops))))
        self._jobs.append(job)

    def take_settled(self) -> list[SettledFill]:
        now = time.monotonic()
        settled: list[SettledFill] = []
        for job in self._jobs:
            if job.settled:
                continue
            done = all(batch.future.done() for batch in job.batches)
            if not done and now < job.deadline:
                continue
            job.settled = True
            ok = job.ok_slots | {result.op.slot for batch in job.batches if batch.future.done()
                                 for result in batch.future.result()[0] if result.result is ReadResult.OK}
            settled.append(SettledFill(job.job_id, frozenset(ok), timed_out=not done))
        return settled

    def take_results(self) -> tuple[list[SlotResult], float]:
        """Results of every read that finished since the last call (each once), and the seconds
        the remote reads among them took (the cost model's input)."""
        results: list[SlotResult] = []
        remote_seconds = 0.0
        keep: list[_Job] = []
        for job in self._jobs:
            pending = [batch for batch in job.batches if not batch.future.done()]
            for batch in job.batches:
                if batch.future.done():
                    batch_results, seconds = batch.future.result()
                    results += batch_results
                    job.ok_slots.update(r.op.slot for r in batch_results if r.result is ReadResult.OK)
                    if batch.tier == "remote":
                        remote_seconds += seconds
            job.batches = pending
            if pending or not job.settled:
                keep.append(job)
        self._jobs = keep
        return results, remote_seconds

    @property
    def num_in_flight(self) -> int:
        """Jobs not settled yet."""
        return sum(1 for job in self._jobs if not job.settled)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every submitted read finished (tests, shutdown); False on timeout."""
        futures = [batch.future for job in self._jobs for batch in job.batches]
        _, not_done = concurrent.futures.wait(futures, timeout=timeout_s)
        return not not_done

    def close(self) -> None:
        for pool in [*self._threads.values(), self._disk_readers]:
            pool.shutdown(wait=False, cancel_futures=True)  # a read stuck on a dead server must not hold up exit

    # ----- on the background threads ----------------------------------------------------------
    def _read_disk(self, ops: list[SlotOp]) -> tuple[list[SlotResult], float]:
        assert self._disk is not None
        started = time.perf_counter()
        results = list(self._disk_readers.map(self._read_disk_one, ops))
        return results, time.perf_counter() - started

    def _read_disk_one(self, op: SlotOp) -> SlotResult:
        assert self._disk is not None
        return SlotResult(op, "disk", self._disk.read_into(op.key, self._rank, self._slot_view(op.slot),
                                                           namespace=op.namespace))

    def _read_remote(self, ops: list[SlotOp]) -> tuple[list[SlotResult], float]:
        assert self._remote is not None
        started = time.perf_counter()
        by_namespace: dict[str, list[SlotOp]] = {}
        for op in ops:
            by_namespace.setdefault(op.namespace, []).append(op)
        results: list[SlotResult] = []
        for namespace, group in by_namespace.items():
            items = [(op.key, self._slot_view(op.slot)) for op in group]
            outcomes = self._remote.get_many_into(items, self._rank, self._layout_fingerprint, namespace=namespace)
            results += [SlotResult(op, "remote", outcome) for op, outcome in zip(group, outcomes)]
        return results, time.perf_counter() - started
