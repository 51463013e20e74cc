"""The engine-neutral core of kvtier: one ``KVManager`` per engine decides every load and store.

It keeps the books of every tier (the memory slots, the disk index and the tenants' limits in
``TieredStore``; what the remote holds in ``RemoteKnowledge``), answers a request's lookup with the
chunks each tier can give, plans loads and stores in two phases (prepare now; complete when the
worker reports success or failure), and decides remote fetches (the cost gate: does a fetch beat
recomputing? the handoff wait: are a prefill instance's chunks there yet?). It never moves a
byte: the plans it makes name slots and keys, and the transfer executor (``kvtier.transfers``) and
the engine's data path run them. An engine integration translates its engine's calls into these
methods; see ``kvtier.integrations.vllm.scheduler`` for vLLM.

Threading: one thread at a time (the engine's scheduler thread, or an admin thread holding the
integration's lock). No method does disk or network I/O: remote lookups run on a background
thread (``RemoteLookups``) and a pending answer is "ask again later" (None).

Load protocol for one request (``owner``):
1. ``plan_load`` -> None (ask again: a remote answer or a handoff is pending), or a ``PlannedLoad``:
   the consecutive chunks from ``first`` that memory, disk and remote can give, each with its
   memory slot, and the disk and remote reads that must fill slots first (then the load is
   asynchronous). Every chunk is leased to ``owner``: no slot is reused under the load.
2. The engine either dispatches it (its worker runs the reads and the copies) and later calls
   ``load_finished``, or gives it back unused with ``cancel_load``.
3. ``release`` (request finished or aborted) ends every lease of ``owner``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from kvtier.admission import Admission
from kvtier.config import KVTierConfig
from kvtier.costmodel import CostModel
from kvtier.events import EventLog
from kvtier.metrics import TIERS, Metrics
from kvtier.plans import SlotOp, StepPlan, WorkerReport
from kvtier.remote_lookup import RemoteLookups
from kvtier.store import DiskItem, DiskSettings, Invalidated, TieredStore
from kvtier.tiers.remote import RemoteTier

logger = logging.getLogger("kvtier")

REMOTE_KNOWN_KEYS = 200_000
ADMISSION_REMEMBERED_KEYS = 200_000  # chunk keys whose sightings the admission rule remembers (~30 MB)
EXPIRE_EVERY_S = 5.0  # how often entries past their namespace's TTL are removed (lookups never see them)
HANDOFF_POLL_S = 0.01  # a request waiting for a handoff asks the remote at most this often
LOOKUP_INLINE_WAIT_S = 0.002  # how long a lookup waits for the remote's answer before "ask again"


@dataclass(frozen=True)
class LoadRequest:
    """What an engine asks for one request: ``keys`` are the chunk keys of its prompt (up to the
    last chunk a load may cover), the engine already holds the chunks before ``first``, and a
    prefill instance announced ``expect_chunks`` chunks for it (0: no handoff)."""

    owner: str
    namespace: str
    keys: Sequence[bytes]
    first: int
    expect_chunks: int = 0


@dataclass(frozen=True)
class PlannedLoad:
    """The chunks ``first .. first+len(slots)`` of a request, loadable from these memory slots once
    the ``disk`` and ``remote`` reads have filled theirs. ``sources``: the tier of each chunk."""

    slots: tuple[int, ...]
    sources: tuple[str, ...]
    disk: tuple[SlotOp, ...] = ()
    remote: tuple[SlotOp, ...] = ()

    @property
    def num_chunks(self) -> int:
        return len(self.slots)

    @property
    def is_async(self) -> bool:
        """Reads from disk or remote come first: the engine must not wait for them in a step."""
        return bool(self.disk or self.remote)


NO_LOAD = PlannedLoad((), ())


@dataclass
class _Owner:
    """What the manager remembers about one request between calls."""

    handoff_until: float = 0.0  # monotonic deadline of a handoff wait (0: not started, -1: decided)
    remote_asked_at: float = 0.0  # when the remote last answered for it
    remote_held: int = 0  # chunks the remote held at that answer
    counted: bool = False  # its hits and misses are in the metrics
    observed: bool = False  # its keys were shown to the admission rule
    load_failed: bool = False  # a load of it failed on some rank: the engine recomputes, never asks again


class RemoteKnowledge:
    """Chunks known to be on the remote tier (found by lookups or uploaded), most recent last,
    bounded: a store never uploads a chunk the remote is known to hold. With ``events``, what it
    learns and forgets is recorded as the ``remote`` tier's stored and removed events."""

    def __init__(self, capacity: int = REMOTE_KNOWN_KEYS) -> None:
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity
        self.events: EventLog | None = None

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def remember(self, key: bytes) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)
            return
        self._keys[key] = None
        if self.events is not None:
            self.events.stored("remote", key)
        if len(self._keys) > self._capacity:
            self.forget(next(iter(self._keys)))

    def forget(self, key: bytes) -> None:
        if key in self._keys:
            del self._keys[key]
            if self.events is not None:
                self.events.removed("remote", key)

    def clear(self) -> None:
        for key in list(self._keys):
            self.forget(key)


class KVManager:
    """Books and decisions for one engine (all its tensor-parallel ranks); see the module docstring."""

    def __init__(self, config: KVTierConfig, store: TieredStore, metrics: Metrics, remote: RemoteTier | None,
                 chunk_tokens: int, chunk_bytes: int, world_size: int) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.remote = remote
        self.events: EventLog | None = None
        self.remote_known = RemoteKnowledge()
        self.lookups = None if remote is None else \
            RemoteLookups(remote, 0, config.remote.timeout_ms / 1000, LOOKUP_INLINE_WAIT_S)
        self.cost = CostModel(min_step_tokens=chunk_tokens)
        self.admission = Admission(config.admission.policy, config.admission.min_reuse_percent / 100,
                                   config.admission.window, ADMISSION_REMEMBERED_KEYS)
        self._chunk_tokens = chunk_tokens
        self._chunk_bytes = chunk_bytes
        self._world_size = world_size
        self._settling: dict[str, list[tuple[int, int]]] = {}  # request -> (planned, loaded) of the ranks so far
        self._load_tiers: dict[str, tuple[tuple[str, int], ...]] = {}  # request -> (tier, tokens) per chunk loaded
        self._owners: dict[str, _Owner] = {}
        self._next_expire = time.monotonic() + EXPIRE_EVERY_S

    @classmethod
    def open(cls, config: KVTierConfig, num_slots: int, chunk_tokens: int, chunk_bytes: int, world_size: int,
             disk_entries: int | None, initial_disk: Sequence[DiskItem], metrics: Metrics,
             remote: RemoteTier | None) -> "KVManager":
        """A manager with a fresh store: ``num_slots`` memory slots, a disk tier of
        ``disk_entries`` entries (None: no disk tier) holding ``initial_disk``."""
        disk = None if disk_entries is None else \
            DiskSettings(disk_entries, config.disk.write_policy == "write_through", initial_disk)
        store = TieredStore(num_slots, config.memory.policy, disk, world_size, metrics, chunk_bytes,
                            config.namespace_limits, time.time)
        metrics.capacity_entries.labels(tier="memory").set(num_slots)
        metrics.capacity_entries.labels(tier="disk").set(disk_entries or 0)
        metrics.entries.labels(tier="disk").set(store.num_disk_entries)
        return cls(config, store, metrics, remote, chunk_tokens, chunk_bytes, world_size)

    # ----- loads -----------------------------------------------------------------------------
    def plan_load(self, request: LoadRequest) -> PlannedLoad | None:
        """Plan the load of the longest run of ``request.keys`` from ``request.first`` that the
        tiers hold; None: ask again later (a remote answer or a handoff is pending)."""
        owner = self._owners.setdefault(request.owner, _Owner())
        if not owner.observed:
            owner.observed = True
            self.admission.observe(request.keys)
            self.metrics.reuse_ratio.set(self.admission.reuse_ratio or 0.0)
        wanted = list(request.keys[request.first:])
        if not wanted:
            return NO_LOAD
        found = self.store.lookup(wanted)
        remote_ages = self._ask_remote(request, owner, wanted[found.num_chunks:])
        if remote_ages is None:
            return None
        num_remote = len(remote_ages)
        if self._awaiting_handoff(request, owner, request.first + found.num_chunks + num_remote):
            return None
        remote_run = wanted[found.num_chunks:found.num_chunks + num_remote]
        if remote_run and self.config.remote.cost_gate and not self.cost.fetch_pays(len(remote_run) * self._chunk_bytes,
                                                   len(remote_run) * self._chunk_tokens):
            self.metrics.skipped_loads.labels(tier="remote").inc(len(remote_run))
            remote_run = []  # the engine recomputes these faster than the remote delivers them
        planned = self._prepare(request, wanted[:found.num_chunks], set(found.disk_only), remote_run, remote_ages)
        self._count(owner, len(wanted), planned)
        return planned

    def cancel_load(self, owner: str, planned: PlannedLoad) -> None:
        """Give back a planned load the engine did not dispatch: unread slots are freed."""
        self.store.abandon([op.key for op in planned.disk + planned.remote])
        self.store.leases.release(owner)

    def load_finished(self, owner: str) -> None:
        """The worker copied ``owner``'s load into the engine (or gave up on it): end its leases."""
        self.store.leases.release(owner)
        self._set_lease_gauge()

    def release(self, owner: str) -> None:
        """``owner`` finished, was aborted or preempted: end its leases and forget it."""
        self.store.leases.release(owner)
        self._owners.pop(owner, None)
        if self.lookups is not None:
            self.lookups.forget(owner)
        self._set_lease_gauge()

    def _prepare(self, request: LoadRequest, local: list[bytes], disk_only: set[int],
                 remote_run: list[bytes], remote_ages: list[float]) -> PlannedLoad:
        """Lease the memory chunks, then plan the reads; the load ends before the first chunk
        that got no slot. Chunks from the remote keep their age there (``remote_ages``)."""
        in_memory = [key for i, key in enumerate(local) if i not in disk_only]
        self.store.leases.acquire(request.owner, in_memory)  # before any read can evict them
        self.store.touch(local)
        slots: list[int] = []
        sources: list[str] = []
        disk: list[SlotOp] = []
        for i, key in enumerate(local):
            if i in disk_only:
                ops = self.store.prepare_promote(request.owner, request.namespace, [key])
                if not ops:
                    return PlannedLoad(tuple(slots), tuple(sources), tuple(disk))
                disk += ops
            slots.append(self.store.slot_of(key))
            sources.append("disk" if i in disk_only else "memory")
        remote = self.store.prepare_promote(request.owner, request.namespace, remote_run, from_remote=True,
                                            ages_s=remote_ages)
        slots += [op.slot for op in remote]
        sources += ["remote"] * len(remote)
        return PlannedLoad(tuple(slots), tuple(sources), tuple(disk), tuple(remote))

    def _ask_remote(self, request: LoadRequest, owner: _Owner, after_local: list[bytes]) -> list[float] | None:
        """The ages on the remote of the run of ``after_local`` (the chunks after the local
        prefix) it holds, None while its answer is pending. A request waiting for a handoff asks
        at most every ``HANDOFF_POLL_S``."""
        if self.lookups is None or not after_local or owner.load_failed:
            return []
        run: list[bytes] = []
        for key in after_local:
            if self.store.in_memory(key) or self.store.on_disk(key):
                break  # another request is loading it: the next lookup finds it local
            run.append(key)
        if not run:
            return []
        if owner.handoff_until > 0 and time.monotonic() - owner.remote_asked_at < HANDOFF_POLL_S:
            return None
        ages = self.lookups.ask(request.owner, run, request.namespace, self.store.tenants.ttl_of(request.namespace))
        if ages is None:
            return None
        owner.remote_asked_at, owner.remote_held = time.monotonic(), len(ages)
        for key in run[:len(ages)]:
            self.remote_known.remember(key)
        return ages

    def _awaiting_handoff(self, request: LoadRequest, owner: _Owner, num_available: int) -> bool:
        """True while a request that names a handoff finds fewer chunks than the prefill instance
        stored, the remote is up and ``remote.handoff_wait_ms`` has not passed since its first
        lookup. The end of a wait is counted: complete or timed out."""
        expected = min(request.expect_chunks, len(request.keys))
        if not expected or self.remote is None or owner.handoff_until < 0:
            return False
        now = time.monotonic()
        if num_available >= expected or not self.remote.healthy or \
                owner.handoff_until and now >= owner.handoff_until:
            outcome = "complete" if num_available >= expected else "timeout"
            self.metrics.handoffs.labels(outcome=outcome).inc()
            if outcome == "timeout":
                logger.warning("kvtier: request %s expected %d chunks from a prefill instance, the remote "
                               "holds %d: recomputing the rest", request.owner, expected, num_available)
            owner.handoff_until = -1.0  # decided: never wait again
            return False
        if not owner.handoff_until:
            owner.handoff_until = now + self.config.remote.handoff_wait_ms / 1000
        return True

    def _count(self, owner: _Owner, num_looked_up: int, planned: PlannedLoad) -> None:
        """Hits per tier and the misses below each tier, once per request."""
        if owner.counted:
            return
        owner.counted = True
        self.metrics.lookups.inc(num_looked_up)
        remaining = num_looked_up
        for tier in TIERS:
            if tier == "disk" and not self.store.has_disk or tier == "remote" and self.remote is None:
                continue
            hits = planned.sources.count(tier)
            self.metrics.hits.labels(tier=tier).inc(hits)
            remaining -= hits
            self.metrics.misses.labels(tier=tier).inc(remaining)

    # ----- stores ----------------------------------------------------------------------------
    def plan_store(self, key: bytes, namespace: str) -> tuple[int, SlotOp | None] | None:
        """Plan a store of chunk ``key`` of ``namespace`` from the engine: its memory slot, and the
        upload to the remote tier (None when the remote holds it or there is none). None when the
        admission rule declines it (counted), or memory holds it already or has no room (the
        store is dropped and counted)."""
        if not self.store.in_memory(key) and not self.admission.admit(key):
            self.metrics.unadmitted_stores.inc()
            return None
        slot = self.store.prepare_store(key, namespace)
        if slot is None:
            return None
        upload = None
        if self.remote is not None and self.remote.stores_uploads and key not in self.remote_known:
            upload = SlotOp(key, slot, namespace, self.store.tenants.ttl_of(namespace))
            self.remote_known.remember(key)
        return slot, upload

    # ----- per step --------------------------------------------------------------------------
    def take_ops(self) -> StepPlan:
        """The store's operations for the next plan (spills, write-throughs, deletes), after the
        periodic removal of expired entries."""
        if time.monotonic() >= self._next_expire:
            self._next_expire = time.monotonic() + EXPIRE_EVERY_S
            self.store.tenants.expire()
        self._set_lease_gauge()
        return self.store.take_ops()

    def complete(self, report: WorkerReport, step_tokens: int) -> None:
        """Apply what the workers reported; ``step_tokens``: the tokens of the step it ends."""
        self.store.complete(report)
        for key in report.remote_failed:
            self.remote_known.forget(key)
        self.cost.observe_fetch(report.remote_read_bytes, report.remote_fetch_seconds)
        self.cost.observe_step(step_tokens, report.forward_seconds)
        _record_report(self.metrics, report)
        self.metrics.loaded_tokens.inc(report.copied_tokens // self._world_size)
        self.metrics.loaded_tier_tokens.labels(tier="memory").inc(report.copied_tokens // self._world_size)
        for req_id, tiers in report.settled_tiers:  # every rank's plan is the same: the first one tells
            self._load_tiers.setdefault(req_id, tiers)
        self._count_settled_loads(report.settled_loads)
        self.metrics.entries.labels(tier="memory").set(self.store.num_memory_entries)
        self.metrics.entries.labels(tier="disk").set(self.store.num_disk_entries)

    def _count_settled_loads(self, settled: list[tuple[str, int, int]]) -> None:
        """Count an asynchronous load once every rank settled it: a chunk reached the engine only
        if every rank loaded it (the first failure on any rank ends the loaded prefix)."""
        for req_id, planned_tokens, loaded_tokens in settled:
            ranks = self._settling.setdefault(req_id, [])
            ranks.append((planned_tokens, loaded_tokens))
            if len(ranks) < self._world_size:
                continue
            del self._settling[req_id]
            loaded = min(tokens for _, tokens in ranks)
            failed = max(planned for planned, _ in ranks) - loaded
            self.metrics.loaded_tokens.inc(loaded)
            self.metrics.failed_load_tokens.inc(failed)
            self._count_tier_tokens(self._load_tiers.pop(req_id, ()), loaded)
            if failed and req_id in self._owners:  # vLLM reschedules it: it must not plan the same reads again
                self._owners[req_id].load_failed = True

    def _count_tier_tokens(self, tiers: tuple[tuple[str, int], ...], loaded: int) -> None:
        """Credit the first ``loaded`` tokens of a settled load to the tiers its chunks came from."""
        for tier, tokens in tiers:
            credited = min(tokens, loaded)
            if credited <= 0:
                break
            self.metrics.loaded_tier_tokens.labels(tier=tier).inc(credited)
            loaded -= credited

    def invalidate(self, namespace: str, keys: Collection[bytes] | None = None) -> Invalidated:
        """Make ``namespace``'s entries (all, or those among ``keys``) unreachable in memory and on
        disk now (``store.tenants.invalidate``: the next plan carries the deletes to the workers),
        and forget which chunks the remote holds, so invalidated chunks are uploaded again when
        recomputed. The caller removes the remote's copies (``kvtier.admin.service``)."""
        removed = self.store.tenants.invalidate(namespace, keys)
        self.remote_known.clear()
        return removed

    def record_events(self, events: EventLog) -> None:
        """From now on, record what every tier stores and removes in ``events`` (memory and disk
        from the store's books, the remote from what this manager knows it holds)."""
        self.events = events
        self.store.events = events
        self.remote_known.events = events

    def close(self) -> None:
        if self.lookups is not None:
            self.lookups.close()
        if self.remote is not None:
            self.remote.close()

    def _set_lease_gauge(self) -> None:
        self.metrics.lease_owners.set(self.store.leases.num_owners())


def _record_report(metrics: Metrics, report: WorkerReport) -> None:
    """Add the byte counts, errors and latencies of a worker report to the metrics."""
    for tier, read, written in (("memory", report.memory_read_bytes, report.memory_written_bytes),
                                ("disk", report.disk_read_bytes, report.disk_written_bytes),
                                ("remote", report.remote_read_bytes, report.remote_written_bytes)):
        metrics.read_bytes.labels(tier=tier).inc(read)
        metrics.written_bytes.labels(tier=tier).inc(written)
    metrics.wire_read_bytes.labels(tier="remote").inc(report.remote_wire_read_bytes)
    metrics.wire_written_bytes.labels(tier="remote").inc(report.remote_wire_written_bytes)
    metrics.errors.labels(tier="disk").inc(report.num_corrupt + report.num_disk_write_errors)
    metrics.errors.labels(tier="remote").inc(report.num_remote_errors)
    metrics.dropped_stores.labels(tier="disk").inc(report.num_dropped_writes)
    metrics.dropped_stores.labels(tier="remote").inc(report.num_remote_dropped)
    for seconds in report.load_seconds:
        metrics.load_seconds.observe(seconds)
    for seconds in report.load_cpu_seconds:
        metrics.load_cpu_seconds.observe(seconds)
    for seconds in report.store_seconds:
        metrics.store_seconds.observe(seconds)
