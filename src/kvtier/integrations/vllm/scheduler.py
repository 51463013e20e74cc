"""Scheduler side of the vLLM connector: answers "how many tokens can kvtier give", plans loads and
stores into each step's metadata, and applies the workers' reports. Never touches a tensor.

Runs in vLLM's EngineCore process, on the scheduler thread only.

Lookup protocol for one new request (``get_num_new_matched_tokens``):
- chunks in memory: answer at once; the engine loads them synchronously before the forward.
- chunks only on disk, or (after the local prefix) on the remote tier: plan promotes (-> a memory
  slot, verified by the worker), answer ``None`` ("ask again"); once the worker reports them in
  memory, the next call answers with them. An entry that fails verification is dropped and the
  answer stops before it: corrupt data is a miss, it never reaches the engine. A remote fetch is
  planned only when the cost model expects it to beat recomputing.
Only the chunks beyond vLLM's own prefix hit are looked up. The hit always ends on a block boundary
and leaves at least one prompt token to compute.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from kvtier.costmodel import CostModel
from kvtier.integrations.vllm.requests import RequestControls, request_controls
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.keys import chunk_keys
from kvtier.metrics import TIERS, Metrics
from kvtier.plans import LoadOp, SlotOp, StepPlan, StoreOp, WorkerReport
from kvtier.store import DiskItem, DiskSettings, TieredStore
from kvtier.tiers.remote import RemoteTier

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier")

MAX_PROMOTE_ROUNDS = 2
REMOTE_KNOWN_KEYS = 200_000
EXPIRE_EVERY_S = 5.0  # how often entries past their namespace's TTL are removed (lookups never see them)
HANDOFF_POLL_S = 0.01  # a request waiting for a handoff asks the remote at most this often


@dataclass
class RequestState:
    request: "Request"
    controls: RequestControls
    keys: list[bytes] = field(default_factory=list)  # chunk keys of the token ids seen so far
    num_local_tokens: int = 0  # vLLM's own prefix hit at the last lookup
    promoting: list[bytes] = field(default_factory=list)
    promoted_from: dict[bytes, str] = field(default_factory=dict)  # chunk -> tier it came from
    num_promote_rounds: int = 0
    counted: bool = False
    num_store_checked: int = 0  # chunks already considered for storing
    store_keys: list[bytes] = field(default_factory=list)  # chunks this request's blocks were stored as
    handoff_until: float = 0.0  # monotonic deadline of the wait for a prefill instance's uploads (0: none)
    remote_checked_at: float = 0.0  # monotonic time of that check


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(method: Callable[Concatenate["SchedulerSide", _P], _R]) -> Callable[Concatenate["SchedulerSide", _P], _R]:
    """Run ``method`` holding the instance's ``lock`` (vLLM's scheduler thread and the admin API's
    threads both call in)."""
    @functools.wraps(method)
    def locked(self: "SchedulerSide", *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class SchedulerSide:
    """Scheduler-side state of one engine. Every public method runs under ``lock``: vLLM calls
    them from its scheduler thread, the admin API (``kvtier.admin``) from its own threads."""

    def __init__(self, setup: EngineSetup, initial_disk: list[DiskItem], metrics: Metrics,
                 remote: RemoteTier | None) -> None:
        self.setup = setup
        self.lock = threading.RLock()
        self.remote = remote
        self._remote_known: OrderedDict[bytes, None] = OrderedDict()  # chunks known to be on the remote
        self.cost = CostModel(min_step_tokens=setup.chunk_tokens)
        self._last_step_tokens = 0  # tokens scheduled in the step whose report comes next
        self.metrics = metrics
        disk = None
        if setup.disk_dir is not None:
            disk = DiskSettings(setup.disk_capacity_entries, setup.config.disk.write_policy == "write_through",
                                initial_disk)
        self.store = TieredStore(setup.num_slots, setup.config.memory.policy, disk, setup.world_size, metrics,
                                 setup.chunk_bytes, setup.config.namespace_limits, time.time)
        self._next_expire = time.monotonic() + EXPIRE_EVERY_S
        self.requests: dict[str, RequestState] = {}
        metrics.capacity_entries.labels(tier="memory").set(setup.num_slots)
        metrics.capacity_entries.labels(tier="disk").set(setup.disk_capacity_entries)
        metrics.entries.labels(tier="disk").set(self.store.num_disk_entries)
        self._loads: list[LoadOp] = []
        self._loaded_owners: list[str] = []
        self._delayed_frees: list[str] = []
        self.kv_cache_manager: KVCacheManager | None = None
        self._digests: dict[tuple[str, str], bytes] = {}
        self._no_cache = frozenset(filter(None, setup.config.no_cache_namespaces.split(",")))

    # ----- lookup ----------------------------------------------------------------------------
    @_locked
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> int | None:
        started = time.perf_counter()
        state = self._state(request)
        if any(self.store.is_pending(key) for key in state.promoting):
            return None
        state.promoting = []
        if not state.controls.load:
            return 0
        num_tokens = self._lookup(state, num_computed_tokens)
        self.metrics.lookup_seconds.observe(time.perf_counter() - started)
        return num_tokens

    def _lookup(self, state: RequestState, num_local: int) -> int | None:
        prompt = state.request.prompt_token_ids or []
        block, chunk = self.setup.layout.block_size, self.setup.chunk_tokens
        max_hit = (len(prompt) - 1) // block * block
        keys = self._keys(state, prompt)[: -(-max_hit // chunk)]
        first = num_local // chunk  # chunks before this one are in vLLM's own cache
        wanted = keys[first:]
        if not wanted:
            return 0
        if state.handoff_until > 0 and time.monotonic() - state.remote_checked_at < HANDOFF_POLL_S:
            return None  # waiting for a handoff, and the remote was asked moments ago
        found = self.store.lookup(wanted)
        remote_run, num_remote = self._remote_run(state, wanted[found.num_chunks:])
        if self._awaiting_handoff(state, first + found.num_chunks + num_remote, len(keys)):
            return None  # the prefill instance's uploads are still arriving: vLLM asks again
        disk_keys = [wanted[i] for i in found.disk_only]
        if (disk_keys or remote_run) and self._plan_promotes(state, disk_keys, remote_run):
            return None  # promotes planned: vLLM asks again, and they are in memory by then
        num_found = found.disk_only[0] if found.disk_only else found.num_chunks  # ready in memory
        self._count(state, wanted, num_found)
        hit = min((first + num_found) * chunk, max_hit)
        if hit <= num_local:
            return 0
        used = wanted[: -(-hit // chunk) - first]
        self.store.leases.acquire(state.request.request_id, used)
        self.store.touch(used)
        state.num_local_tokens = num_local
        return hit - num_local

    def _awaiting_handoff(self, state: RequestState, num_available: int, num_keys: int) -> bool:
        """True while a request that names a handoff (``expect_tokens``) finds fewer chunks than
        the prefill instance stored, the remote tier is up and ``remote.handoff_wait_ms`` has not
        passed since its first lookup. The end of a wait is counted: complete or timed out."""
        expected = min(state.controls.expect_tokens // self.setup.chunk_tokens, num_keys)
        if not expected or self.remote is None or state.handoff_until < 0:
            return False
        now = time.monotonic()
        if num_available >= expected or not self.remote.healthy or \
                state.handoff_until and now >= state.handoff_until:
            outcome = "complete" if num_available >= expected else "timeout"
            self.metrics.handoffs.labels(outcome=outcome).inc()
            if outcome == "timeout":
                logger.warning("kvtier: request %s expected %d chunks from a prefill instance, the remote "
                               "holds %d: recomputing the rest", state.request.request_id, expected, num_available)
            state.handoff_until = -1.0  # decided: never wait again
            return False
        if not state.handoff_until:
            state.handoff_until = now + self.setup.config.remote.handoff_wait_ms / 1000
        return True

    def _plan_promotes(self, state: RequestState, disk_keys: list[bytes], remote_keys: list[bytes]) -> bool:
        """Plan disk -> memory and remote -> memory reads; False when none could be planned (memory
        full of leased entries, or this request already had its rounds: a flapping tier must not
        hold a request back forever)."""
        if state.num_promote_rounds >= MAX_PROMOTE_ROUNDS:
            return False
        state.num_promote_rounds += 1
        owner, namespace = state.request.request_id, state.controls.namespace
        planned = self.store.prepare_promote(owner, namespace, disk_keys)
        state.promoted_from.update(dict.fromkeys(planned, "disk"))
        if len(planned) == len(disk_keys) and remote_keys:
            from_remote = self.store.prepare_promote(owner, namespace, remote_keys, from_remote=True)
            state.promoted_from.update(dict.fromkeys(from_remote, "remote"))
            planned += from_remote
        state.promoting = planned
        return bool(planned)

    def _remote_run(self, state: RequestState, keys: list[bytes]) -> tuple[list[bytes], int]:
        """The consecutive ``keys`` (after the local prefix) that the remote tier holds, no local
        tier is already handling and are worth fetching (none once the request has had its promote
        rounds), and how many the remote holds (fetched or not: what a handoff waits for)."""
        if self.remote is None or not keys or state.num_promote_rounds >= MAX_PROMOTE_ROUNDS:
            return [], 0
        run: list[bytes] = []
        for key in keys:
            if self.store.in_memory(key) or self.store.on_disk(key):
                break
            run.append(key)
        if not run:
            return [], 0
        namespace = state.controls.namespace
        num_held = self.remote.exists_prefix(run, 0, namespace=namespace, max_age_s=self.store.ttl_of(namespace))
        state.remote_checked_at = time.monotonic()
        for key in run[:num_held]:
            self._remember_remote(key)
        if num_held and not self.cost.fetch_pays(num_held * self.setup.chunk_bytes, num_held * self.setup.chunk_tokens):
            self.metrics.skipped_loads.labels(tier="remote").inc(num_held)
            return [], num_held  # the engine recomputes these faster than the remote delivers them
        return run[:num_held], num_held

    def _remember_remote(self, key: bytes) -> None:
        self._remote_known[key] = None
        self._remote_known.move_to_end(key)
        if len(self._remote_known) > REMOTE_KNOWN_KEYS:
            self._remote_known.popitem(last=False)

    def _count(self, state: RequestState, looked_up: list[bytes], num_found: int) -> None:
        if state.counted:
            return
        state.counted = True
        served = looked_up[:num_found]
        by_tier = {tier: sum(1 for key in served if state.promoted_from.get(key, "memory") == tier)
                   for tier in TIERS}
        self.metrics.lookups.inc(len(looked_up))
        remaining = len(looked_up)
        for tier in TIERS:
            if tier == "disk" and self.setup.disk_dir is None or tier == "remote" and self.remote is None:
                continue
            self.metrics.hits.labels(tier=tier).inc(by_tier[tier])
            remaining -= by_tier[tier]
            self.metrics.misses.labels(tier=tier).inc(remaining)

    @_locked
    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        state = self.requests[request.request_id]
        block_ids = blocks.get_block_ids()[0]
        block, per_chunk = self.setup.layout.block_size, self.setup.blocks_per_chunk
        start = state.num_local_tokens // block
        end = (state.num_local_tokens + num_external_tokens) // block
        for chunk_index in range(start // per_chunk, -(-end // per_chunk)):
            lo, hi = max(start, chunk_index * per_chunk), min(end, (chunk_index + 1) * per_chunk)
            slot = self.store.slot_of(state.keys[chunk_index])
            self._loads.append(LoadOp(slot, lo - chunk_index * per_chunk, tuple(block_ids[lo:hi])))
        self._loaded_owners.append(request.request_id)
        self.metrics.loaded_tokens.inc(num_external_tokens)

    # ----- per step --------------------------------------------------------------------------
    @_locked
    def build_plan(self, scheduler_output: "SchedulerOutput") -> StepPlan:
        self._last_step_tokens = scheduler_output.total_num_scheduled_tokens
        plan = StepPlan()
        for new in scheduler_output.scheduled_new_reqs:
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            self._plan_stores(new.req_id, new.num_computed_tokens + scheduled, plan)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens):
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._plan_stores(req_id, num_computed + scheduled, plan)
        plan.loads, self._loads = self._loads, []
        plan.delayed_frees, self._delayed_frees = self._delayed_frees, []
        for owner in self._loaded_owners:  # slots are safe: the loads run before this step's stores
            self.store.leases.release(owner)
        self._loaded_owners = []
        for req_id in scheduler_output.preempted_req_ids or ():
            self.store.leases.release(req_id)
        self.metrics.lease_owners.set(self.store.leases.num_owners())
        if time.monotonic() >= self._next_expire:
            self._next_expire = time.monotonic() + EXPIRE_EVERY_S
            self.store.expire()
        ops = self.store.take_ops()
        plan.spills, plan.promotes, plan.remote_fetches = ops.spills, ops.promotes, ops.remote_fetches
        plan.write_through, plan.deletes, plan.purges = ops.write_through, ops.deletes, ops.purges
        return plan

    def _plan_stores(self, req_id: str, num_computed_after: int, plan: StepPlan) -> None:
        state = self.requests.get(req_id)
        if state is None or self.kv_cache_manager is None or not state.controls.store:
            return
        request = state.request
        tokens = request.all_token_ids if self.setup.config.store_decode_tokens else request.prompt_token_ids
        tokens = tokens or []
        num_full = min(num_computed_after, len(tokens)) // self.setup.chunk_tokens
        if num_full <= state.num_store_checked:
            return
        keys = self._keys(state, tokens)
        block_ids = self.kv_cache_manager.get_block_ids(req_id)[0]
        per_chunk = self.setup.blocks_per_chunk
        namespace = state.controls.namespace
        for i in range(state.num_store_checked, num_full):
            slot = self.store.prepare_store(keys[i], namespace)
            if slot is None:
                continue
            plan.stores.append(StoreOp(keys[i], slot, tuple(block_ids[i * per_chunk:(i + 1) * per_chunk]), req_id))
            state.store_keys.append(keys[i])
            if self.remote is not None and keys[i] not in self._remote_known:
                # never re-upload what the remote holds
                plan.remote_puts.append(SlotOp(keys[i], slot, namespace, self.store.ttl_of(namespace)))
                self._remember_remote(keys[i])
        state.num_store_checked = num_full

    @_locked
    def complete(self, report: WorkerReport) -> None:
        self.store.complete(report)
        for key in report.remote_failed:
            self._remote_known.pop(key, None)
        self.cost.observe_fetch(report.remote_read_bytes, report.remote_fetch_seconds)
        self.cost.observe_step(self._last_step_tokens, report.forward_seconds)
        m = self.metrics
        m.entries.labels(tier="memory").set(self.store.num_memory_entries)
        m.entries.labels(tier="disk").set(self.store.num_disk_entries)
        m.read_bytes.labels(tier="memory").inc(report.memory_read_bytes)
        m.written_bytes.labels(tier="memory").inc(report.memory_written_bytes)
        m.read_bytes.labels(tier="disk").inc(report.disk_read_bytes)
        m.written_bytes.labels(tier="disk").inc(report.disk_written_bytes)
        m.errors.labels(tier="disk").inc(report.num_corrupt + report.num_disk_write_errors)
        m.dropped_stores.labels(tier="disk").inc(report.num_dropped_writes)
        m.read_bytes.labels(tier="remote").inc(report.remote_read_bytes)
        m.written_bytes.labels(tier="remote").inc(report.remote_written_bytes)
        m.wire_read_bytes.labels(tier="remote").inc(report.remote_wire_read_bytes)
        m.wire_written_bytes.labels(tier="remote").inc(report.remote_wire_written_bytes)
        m.errors.labels(tier="remote").inc(report.num_remote_errors)
        m.dropped_stores.labels(tier="remote").inc(report.num_remote_dropped)
        for seconds in report.load_seconds:
            m.load_seconds.observe(seconds)
        for seconds in report.store_seconds:
            m.store_seconds.observe(seconds)

    def shutdown(self) -> None:
        if self.remote is not None:
            self.remote.close()

    @_locked
    def forget_remote(self) -> None:
        """Forget which chunks the remote holds (after an invalidation removed some)."""
        self._remote_known.clear()

    @_locked
    def request_finished(self, request: "Request") -> tuple[bool, dict[str, object] | None]:
        """Forget the request. Returns whether vLLM must keep its blocks until the worker reports
        its in-flight stores done (stores copy asynchronously and must not read reused blocks),
        and, on a prefill instance (``kv_role: kv_producer``) with a remote tier, the handoff a
        decode instance needs: ``{"kvtier": {"expect_tokens": N}}`` (plus the namespace, when the
        request named one), which the client or proxy passes on in ``kv_transfer_params``."""
        self.store.leases.release(request.request_id)
        state = self.requests.pop(request.request_id, None)
        delay = state is not None and any(self.store.is_pending(key) for key in state.store_keys)
        if delay:
            self._delayed_frees.append(request.request_id)
        self.metrics.lease_owners.set(self.store.leases.num_owners())
        return delay, self._handoff(state)

    def _handoff(self, state: RequestState | None) -> dict[str, object] | None:
        if state is None or not self.setup.producer or self.remote is None or not state.controls.store:
            return None
        num_tokens = len(state.request.prompt_token_ids or []) // self.setup.chunk_tokens * self.setup.chunk_tokens
        if not num_tokens:
            return None
        section: dict[str, object] = {"expect_tokens": num_tokens}
        if state.controls.namespace != self.setup.config.namespace:
            section["namespace"] = state.controls.namespace
        return {"kvtier": section}

    # ----- helpers ---------------------------------------------------------------------------
    def _state(self, request: "Request") -> RequestState:
        state = self.requests.get(request.request_id)
        if state is None:
            controls = request_controls(request.kv_transfer_params, request.cache_salt, self.setup.config.namespace,
                                        self._no_cache)
            state = self.requests[request.request_id] = RequestState(request, controls=controls)
        return state

    def _digest(self, controls: RequestControls) -> bytes:
        """Namespace digest of a request's tenant and salt (cached: few distinct values)."""
        name = (controls.namespace, controls.salt)
        digest = self._digests.get(name)
        if digest is None:
            digest = replace(self.setup.namespace, tenant=controls.namespace, salt=controls.salt).digest()
            self._digests[name] = digest
        return digest

    def _keys(self, state: RequestState, tokens: list[int]) -> list[bytes]:
        """Chunk keys of ``tokens``, extending the cached chain as the request grows."""
        num_full = len(tokens) // self.setup.chunk_tokens
        if len(state.keys) < num_full:
            parent = state.keys[-1] if state.keys else None
            more = chunk_keys(self._digest(state.controls), tokens, self.setup.chunk_tokens,
                              start=len(state.keys), parent=parent)
            state.keys.extend(key.digest for key in more)
        return state.keys
