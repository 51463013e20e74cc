"""Scheduler side of the vLLM connector: answers "how many tokens can kvtier give", plans loads and
stores into each step's metadata, and applies the workers' reports. Never touches a tensor.

Runs in vLLM's EngineCore process, on the scheduler thread only.

Lookup protocol for one new request (``get_num_new_matched_tokens``):
- chunks in memory: answer at once; the engine loads them synchronously before the forward.
- chunks only on disk: plan promotes (disk -> memory slot, verified by the worker), answer ``None``
  ("ask again"); once the worker reports them in memory, the next call answers with them. A disk
  entry that fails verification is dropped and the answer stops before it: corrupt data is a miss,
  it never reaches the engine.
The hit always ends on a block boundary and leaves at least one prompt token to compute.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kvtier.integrations.vllm.requests import RequestControls, request_controls
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.keys import chunk_keys
from kvtier.metrics import Metrics
from kvtier.plans import LoadOp, StepPlan, StoreOp, WorkerReport
from kvtier.store import DiskSettings, TieredStore

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier")


@dataclass
class RequestState:
    request: "Request"
    keys: list[bytes] = field(default_factory=list)  # chunk keys of the token ids seen so far
    num_local_tokens: int = 0  # vLLM's own prefix hit at the last lookup
    promoting: list[bytes] = field(default_factory=list)
    promoted: set[bytes] = field(default_factory=set)
    counted: bool = False
    num_store_checked: int = 0  # chunks already considered for storing
    controls: RequestControls = field(default_factory=lambda: RequestControls("", True, True))


class SchedulerSide:
    def __init__(self, setup: EngineSetup, initial_disk_keys: list[bytes], metrics: Metrics) -> None:
        self.setup = setup
        self.metrics = metrics
        disk = None
        if setup.disk_dir is not None:
            disk = DiskSettings(setup.disk_capacity_entries, setup.config.disk.write_policy == "write_through",
                                initial_disk_keys)
        self.store = TieredStore(setup.num_slots, setup.config.memory.policy, disk, setup.world_size, metrics)
        self.requests: dict[str, RequestState] = {}
        metrics.capacity_entries.labels(tier="memory").set(setup.num_slots)
        metrics.capacity_entries.labels(tier="disk").set(setup.disk_capacity_entries)
        metrics.entries.labels(tier="disk").set(self.store.num_disk_entries)
        self._loads: list[LoadOp] = []
        self._loaded_owners: list[str] = []
        self.kv_cache_manager: KVCacheManager | None = None
        self._digests: dict[tuple[str, str], bytes] = {}

    # ----- lookup ----------------------------------------------------------------------------
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
        first = num_local // chunk
        found = self.store.lookup(keys)
        to_promote = [keys[i] for i in found.disk_only if i >= first]
        if to_promote:
            planned = self.store.prepare_promote(state.request.request_id, to_promote)
            if planned:
                state.promoting = planned
                state.promoted.update(planned)
                return None
            found_chunks = min(found.num_chunks, keys.index(to_promote[0]))
        else:
            found_chunks = found.num_chunks
        hit = min(found_chunks * chunk, max_hit)
        self._count(state, keys[first:], found_chunks - first)
        if hit <= num_local:
            return 0
        used = keys[first: -(-hit // chunk)]
        self.store.leases.acquire(state.request.request_id, used)
        self.store.touch(used)
        state.num_local_tokens = num_local
        return hit - num_local

    def _count(self, state: RequestState, looked_up: list[bytes], num_found: int) -> None:
        if state.counted or not looked_up:
            return
        state.counted = True
        num_found = max(num_found, 0)
        num_disk = sum(1 for key in looked_up[:num_found] if key in state.promoted)
        num_memory = num_found - num_disk
        self.metrics.lookups.inc(len(looked_up))
        self.metrics.hits.labels(tier="memory").inc(num_memory)
        self.metrics.misses.labels(tier="memory").inc(len(looked_up) - num_memory)
        if self.setup.disk_dir is not None:
            self.metrics.hits.labels(tier="disk").inc(num_disk)
            self.metrics.misses.labels(tier="disk").inc(len(looked_up) - num_found)

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
    def build_plan(self, scheduler_output: "SchedulerOutput") -> StepPlan:
        plan = StepPlan()
        for new in scheduler_output.scheduled_new_reqs:
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            self._plan_stores(new.req_id, new.num_computed_tokens + scheduled, plan)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens):
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._plan_stores(req_id, num_computed + scheduled, plan)
        plan.loads, self._loads = self._loads, []
        for owner in self._loaded_owners:  # slots are safe: the loads run before this step's stores
            self.store.leases.release(owner)
        self._loaded_owners = []
        for req_id in scheduler_output.preempted_req_ids or ():
            self.store.leases.release(req_id)
        self.metrics.lease_owners.set(self.store.leases.num_owners())
        ops = self.store.take_ops()
        plan.spills, plan.promotes = ops.spills, ops.promotes
        plan.write_through, plan.deletes = ops.write_through, ops.deletes
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
        for i in range(state.num_store_checked, num_full):
            slot = self.store.prepare_store(keys[i])
            if slot is not None:
                plan.stores.append(StoreOp(keys[i], slot, tuple(block_ids[i * per_chunk:(i + 1) * per_chunk])))
        state.num_store_checked = num_full

    def complete(self, report: WorkerReport) -> None:
        self.store.complete(report)
        m = self.metrics
        m.entries.labels(tier="memory").set(self.store.num_memory_entries)
        m.entries.labels(tier="disk").set(self.store.num_disk_entries)
        m.read_bytes.labels(tier="memory").inc(report.memory_read_bytes)
        m.written_bytes.labels(tier="memory").inc(report.memory_written_bytes)
        m.read_bytes.labels(tier="disk").inc(report.disk_read_bytes)
        m.written_bytes.labels(tier="disk").inc(report.disk_written_bytes)
        m.errors.labels(tier="disk").inc(report.num_corrupt + report.num_disk_write_errors)
        m.dropped_stores.labels(tier="disk").inc(report.num_dropped_writes)
        for seconds in report.load_seconds:
            m.load_seconds.observe(seconds)
        for seconds in report.store_seconds:
            m.store_seconds.observe(seconds)

    def request_finished(self, request: "Request") -> None:
        self.store.leases.release(request.request_id)
        self.requests.pop(request.request_id, None)
        self.metrics.lease_owners.set(self.store.leases.num_owners())

    # ----- helpers ---------------------------------------------------------------------------
    def _state(self, request: "Request") -> RequestState:
        state = self.requests.get(request.request_id)
        if state is None:
            controls = request_controls(request.kv_transfer_params, request.cache_salt, self.setup.config.namespace)
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
