"""What the worker must do in one engine step: addresses, never data.

The scheduler-side store (``kvtier.store``) builds one ``StepPlan`` per engine step; the worker-side
data path executes it and answers with one ``WorkerReport``. Both cross the process boundary inside
vLLM's connector metadata, so they hold only plain values (ints, bytes, tuples).

Execution order on the worker (it matters, slots are reused):
1. ``spills``: copy each named memory slot aside for a disk write (before the slot is reused).
2. ``async_loads``: hand each request's disk / remote reads (into memory slots, verified) to the
   transfer executor (``kvtier.transfers``), which runs them on background threads; once a
   request's reads are settled (done, or past their deadline) the worker copies the slots that
   hold verified data into the request's engine blocks and reports the request's load finished,
   and the blocks of the rest as failed (the engine recomputes them).
3. ``loads``: copy memory slots into engine blocks (before the forward).
4. ``stores``: copy engine blocks into memory slots (after the forward).
5. once the copies of 4. are done (CUDA: later; steps finish in order):
   ``deletes`` / ``purges``: remove disk entries / whole namespaces from disk, queued behind
   every write of earlier steps (a write in flight never outlives its delete), then
   ``write_through`` / ``remote_puts``: copy the freshly stored slots aside for a disk write /
   an upload (a write planned after an invalidation is never undone by it).

Every operation that names bytes on disk or on the remote names the tenant namespace too: it is
part of the entry's path and object name, and the context its encryption key is derived for.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockRun:
    """Blocks ``first_block .. first_block+len(block_ids)`` of a chunk (positions in the chunk) and
    the engine blocks ``block_ids`` that hold them, in one KV cache group."""

    first_block: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class LoadOp:
    """Copy blocks ``first_block .. first_block+len(block_ids)`` of memory slot ``slot`` into the
    engine blocks ``block_ids``. With several KV cache groups (``kvtier.kvgroups``), ``groups``
    holds one run per group, in group order, and is what is copied; ``first_block`` and
    ``block_ids`` are then the full-attention group's run, which counts the tokens."""

    slot: int
    first_block: int
    block_ids: tuple[int, ...]
    groups: tuple[BlockRun, ...] = ()


@dataclass(frozen=True)
class StoreOp:
    """Copy the engine blocks ``block_ids`` (one whole chunk) of request ``req_id`` into memory
    slot ``slot``. With several KV cache groups, ``groups`` holds one run per group (for a
    sliding-window group only the blocks its window needs at the chunk's end)."""

    key: bytes
    slot: int
    block_ids: tuple[int, ...]
    req_id: str = ""
    groups: tuple[BlockRun, ...] = ()


@dataclass(frozen=True)
class SlotOp:
    """A chunk ``key`` of ``namespace`` and the memory slot it lives in (promote target, disk-write
    or upload source). ``ttl_s`` (uploads only): the namespace's TTL, 0 = the tier's own."""

    key: bytes
    slot: int
    namespace: str
    ttl_s: int = 0


@dataclass(frozen=True)
class EntryRef:
    """A chunk ``key`` of ``namespace`` (a disk entry to delete)."""

    key: bytes
    namespace: str


@dataclass(frozen=True)
class Invalidation:
    """An admin invalidation of ``namespace`` (``keys`` None: all of it) that the worker applies
    to its upload queue: queued uploads of those entries are dropped, and the remote deletes them
    again behind the uploads already in flight."""

    namespace: str
    keys: tuple[bytes, ...] | None


@dataclass(frozen=True)
class AsyncLoad:
    """One request's load that needs disk or remote reads first: read ``disk`` and ``remote``
    into their memory slots (background), then copy ``loads`` (in prompt order, one chunk each)
    into the engine blocks; a chunk whose slot did not get verified data by ``deadline_s``
    seconds after the worker saw the plan, and every chunk after it, is not copied and its
    blocks are reported as failed."""

    req_id: str
    disk: tuple[SlotOp, ...]
    remote: tuple[SlotOp, ...]
    loads: tuple[LoadOp, ...]
    deadline_s: float


@dataclass
class StepPlan:
    spills: list[SlotOp] = field(default_factory=list)
    async_loads: list[AsyncLoad] = field(default_factory=list)
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    write_through: list[SlotOp] = field(default_factory=list)
    remote_puts: list[SlotOp] = field(default_factory=list)
    deletes: list[EntryRef] = field(default_factory=list)
    purges: list[str] = field(default_factory=list)  # namespaces whose disk entries all go
    invalidations: list[Invalidation] = field(default_factory=list)  # for the upload queue
    # finished requests whose blocks vLLM keeps until the worker reports their stores done
    # (``get_finished``): stores run asynchronously and must not read freed blocks
    delayed_frees: list[str] = field(default_factory=list)
    # requests preempted in this step: vLLM frees their blocks, so their stores must be done first
    preempted: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.spills or self.async_loads or self.loads or self.stores
                    or self.write_through or self.remote_puts or self.deletes or self.purges
                    or self.invalidations or self.delayed_frees)


@dataclass
class WorkerReport:
    """What one worker did since its last report. Lists of chunk keys; byte counts per tier.

    ``aggregate`` merges the reports of several tensor-parallel ranks: key lists are concatenated
    (the scheduler commits a key once every rank reported it) and counters summed.
    """

    stored: list[bytes] = field(default_factory=list)
    promoted: list[bytes] = field(default_factory=list)
    promote_failed: list[bytes] = field(default_factory=list)
    disk_written: list[bytes] = field(default_factory=list)
    disk_failed: list[bytes] = field(default_factory=list)
    num_corrupt: int = 0
    num_disk_write_errors: int = 0
    num_dropped_writes: int = 0
    memory_read_bytes: int = 0
    memory_written_bytes: int = 0
    disk_read_bytes: int = 0
    disk_written_bytes: int = 0
    remote_failed: list[bytes] = field(default_factory=list)  # uploads or fetches that failed
    remote_read_bytes: int = 0
    remote_fetch_seconds: float = 0.0
    forward_seconds: float = 0.0  # from start_load_kv to wait_for_save of the last step (max over ranks)
    remote_written_bytes: int = 0
    remote_wire_read_bytes: int = 0  # the same reads and writes as stored values (compressed, sealed)
    remote_wire_written_bytes: int = 0
    num_remote_errors: int = 0
    num_remote_dropped: int = 0
    # change in the length of the background queues since the last report (summed over ranks)
    disk_queue_delta: int = 0
    upload_queue_delta: int = 0
    copied_tokens: int = 0  # tokens copied from memory before the forward (sum over ranks, each the same)
    # one per rank and settled asynchronous load: (request id, tokens planned, tokens loaded). A
    # chunk reaches the engine only if every rank loaded it (vLLM recomputes what failed on any)
    settled_loads: list[tuple[str, int, int]] = field(default_factory=list)
    # one per rank and settled asynchronous load: (request id, (tier, tokens) of each chunk of the
    # load in order); the manager credits the loaded prefix of ``settled_loads`` to these tiers
    settled_tiers: list[tuple[str, tuple[tuple[str, int], ...]]] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    load_cpu_seconds: list[float] = field(default_factory=list)  # engine-thread CPU time of each load
    store_seconds: list[float] = field(default_factory=list)

    def aggregate(self, other: "WorkerReport") -> "WorkerReport":
        merged = WorkerReport()
        for name, value in vars(self).items():
            setattr(merged, name, value + getattr(other, name))
        merged.forward_seconds = max(self.forward_seconds, other.forward_seconds)
        return merged

    def is_empty(self) -> bool:
        return not any(vars(self).values())
