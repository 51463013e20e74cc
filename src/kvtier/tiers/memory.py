"""The memory tier in one process: the store's memory books plus the host slots that hold the bytes.

In vLLM the two halves live in two processes: the books (``kvtier.store.TieredStore``: which key is
in which slot, eviction, leases, tenants) on the scheduler side, the slots (``kvtier.datapath.
HostPool``) in each worker, and the step plan carries slot numbers between them. An engine that
runs in one process (the transformers integration) and the contract suite join them here, so the
memory tier answers the same contract as disk and remote (``kvtier.tiers.contract``).

Both halves are typed by what this module needs (``MemoryBooks``, ``SlotBuffers``), so the tiers
do not import the store or torch: ``TieredStore`` and ``HostPool`` fit them as they are. The books
must belong to one rank (world size 1) and have no disk tier: a write is complete as soon as its
bytes are in the slot. Keys are bound to their namespace by the books (an entry of one namespace is
absent in every other; a write of a key another namespace holds returns False).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from kvtier.config import NAMESPACE_RULE, is_namespace
from kvtier.plans import StepPlan, WorkerReport
from kvtier.tiers.contract import ReadResult


class Removed(Protocol):
    """How many memory entries an invalidation removed (``kvtier.store_types.Invalidated``)."""

    @property
    def memory(self) -> int: ...


class Invalidates(Protocol):
    """Invalidation of a namespace's entries (``kvtier.tenant_control.TenantControl``)."""

    def invalidate(self, namespace: str, keys: Collection[bytes] | None = None) -> Removed: ...


class MemoryBooks(Protocol):
    """What the memory tier asks of the store's books (``TieredStore`` implements it)."""

    @property
    def tenants(self) -> Invalidates: ...

    def memory_prefix(self, keys: Sequence[bytes], namespace: str) -> int: ...

    def slot_of(self, key: bytes) -> int: ...

    def touch(self, keys: Sequence[bytes]) -> None: ...

    def prepare_store(self, key: bytes, namespace: str) -> int | None: ...

    def complete(self, report: WorkerReport) -> None: ...

    def take_ops(self) -> StepPlan: ...


class SlotBuffers(Protocol):
    """Fixed-size slots of bytes (``HostPool`` implements it)."""

    slot_bytes: int

    def memoryview(self, index: int) -> memoryview: ...


class MemoryTier:
    """The memory tier of one rank: ``books`` say where each entry is, ``slots`` hold its bytes."""

    def __init__(self, books: MemoryBooks, slots: SlotBuffers, layout_fingerprint: bytes, rank: int = 0) -> None:
        self.books = books
        self.slots = slots
        self.layout_fingerprint = layout_fingerprint
        self.rank = rank

    def exists_prefix(self, keys: Sequence[bytes], rank: int, *, namespace: str, max_age_s: int = 0) -> int:
        """Consecutive ``keys`` held ready in memory (the books expire entries by their
        namespace's TTL, so ``max_age_s`` is not needed); 0 for another rank."""
        _check_namespace(namespace)
        return self.books.memory_prefix(keys, namespace) if rank == self.rank else 0

    def get_many_into(self, items: Sequence[tuple[bytes, memoryview]], rank: int, layout_fingerprint: bytes,
                      *, namespace: str) -> list[ReadResult]:
        """Copy each held entry's slot into its ``out`` (a use: the eviction policy hears of it);
        MISSING for the others. ValueError for another layout or an ``out`` of another size than
        a slot."""
        self._check(layout_fingerprint, [out for _, out in items])
        _check_namespace(namespace)
        results = []
        for key, out in items:
            if not self.exists_prefix([key], rank, namespace=namespace):
                results.append(ReadResult.MISSING)
                continue
            memoryview(out).cast("B")[:] = self.slots.memoryview(self.books.slot_of(key))
            self.books.touch([key])
            results.append(ReadResult.OK)
        return results

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]], rank: int, layout_fingerprint: bytes,
                 *, namespace: str, ttl_s: int = 0) -> list[bool]:
        """Copy each payload into a slot the books give it, then make the batch's entries visible
        together (one report), so a batch never evicts its own entries. False where memory has no
        room for it (every other entry leased or pending, or the namespace at its quota), another
        namespace holds the key, or ``rank`` is not this tier's. ``ttl_s``: the books keep the
        namespace's TTL."""
        self._check(layout_fingerprint, [payload for _, payload in items])
        _check_namespace(namespace)
        done, stored = [], []
        for key, payload in items:
            if rank != self.rank:
                done.append(False)
                continue
            if self.exists_prefix([key], rank, namespace=namespace):
                done.append(True)
                continue
            slot = self.books.prepare_store(key, namespace)
            if slot is not None:
                self.slots.memoryview(slot)[:] = memoryview(payload).cast("B")
                stored.append(key)
            done.append(slot is not None)
        self.books.complete(WorkerReport(stored=stored))
        return done

    def delete(self, keys: Sequence[bytes], rank: int, *, namespace: str) -> int:
        """Remove ``keys`` of ``namespace`` from the books (a leased entry's slot is freed when its
        lease ends); how many were held."""
        _check_namespace(namespace)
        if rank != self.rank or not keys:
            return 0
        return self._removed(self.books.tenants.invalidate(namespace, set(keys)))

    def delete_namespace(self, namespace: str) -> int | None:
        _check_namespace(namespace)
        return self._removed(self.books.tenants.invalidate(namespace))

    def _removed(self, removed: Removed) -> int:
        self.books.take_ops()  # an invalidation's plan ops are for workers; this process has none
        return removed.memory

    def _check(self, layout_fingerprint: bytes, buffers: Sequence[bytes | memoryview]) -> None:
        if layout_fingerprint != self.layout_fingerprint:
            raise ValueError(f"this memory tier holds layout {self.layout_fingerprint.hex()}, "
                             f"not {layout_fingerprint.hex()}")
        for buffer in buffers:
            if memoryview(buffer).nbytes != self.slots.slot_bytes:
                raise ValueError(f"a memory entry is {self.slots.slot_bytes} bytes, got {memoryview(buffer).nbytes}")


def _check_namespace(namespace: str) -> None:
    if not is_namespace(namespace):
        raise ValueError(f"namespace {namespace!r} is not {NAMESPACE_RULE}")
