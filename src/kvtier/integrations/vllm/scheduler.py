"""Scheduler side of the vLLM connector: translates vLLM's scheduler calls into the engine-neutral
``KVManager`` (``kvtier.manager``), and its plans into each step's metadata. Never touches a tensor
and does no I/O.

Runs in vLLM's EngineCore process, on the scheduler thread (the admin API's threads take ``lock``
too).

Lookup protocol for one new request (``get_num_new_matched_tokens``):
- a remote answer or a handoff is pending: ``None`` (vLLM asks again next step; others run);
- every chunk of the hit is in memory: the hit, loaded synchronously before the next forward
  (a copy from host memory: no I/O);
- some chunks come from disk or the remote: the hit, asynchronous. vLLM allocates the blocks and
  parks the request (WAITING_FOR_REMOTE_KVS) while the worker reads the chunks on background
  threads; the worker copies what was verified into the blocks, reports the request's load
  finished and the blocks it could not fill as load errors, which vLLM recomputes. Corrupt data
  is a miss, it never reaches the engine.
Only the chunks beyond vLLM's own prefix hit are looked up. The hit always ends on a block
boundary and leaves at least one prompt token to compute.
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

from kvtier.integrations.vllm.compat import RequestBlocks
from kvtier.integrations.vllm.events import EXTRA_CHUNKS, KVEvents, adapter_of
from kvtier.integrations.vllm.requests import RequestControls, Trust, content_binding, request_controls
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.keys import chunk_keys
from kvtier.manager import KVManager, LoadRequest, PlannedLoad
from kvtier.metrics import Metrics
from kvtier.plans import AsyncLoad, LoadOp, StepPlan, StoreOp, WorkerReport
from kvtier.signing import HandoffClaim, SigningKey, prompt_id_of, sign_handoff
from kvtier.store import DiskItem, TieredStore
from kvtier.tiers.disk_tokens import ChunkTokenFiles
from kvtier.tiers.remote import RemoteTier

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier")

DISK_LOAD_DEADLINE_S = 10.0  # a load from disk alone that takes longer is given up (recomputed)
DIGEST_CACHE_SIZE = 4096  # namespace digests kept per engine (tenant x salt pairs)
HANDOFF_TTL_S = 600  # a signed handoff is honoured this long after the prefill step


@dataclass
class RequestState:
    request: "Request"
    controls: RequestControls
    keys: list[bytes] = field(default_factory=list)  # chunk keys of the token ids seen so far
    num_local_tokens: int = 0  # vLLM's own prefix hit at the last lookup
    planned: PlannedLoad | None = None  # the load answered to vLLM, until it is dispatched
    first_chunk: int = 0  # the first chunk of ``planned``
    loading: bool = False  # an asynchronous load is in flight on the worker
    num_store_checked: int = 0  # chunks already considered for storing
    store_keys: list[bytes] = field(default_factory=list)  # chunks this request's blocks were stored as


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
                 remote: RemoteTier | None, signing_key: SigningKey | None = None) -> None:
        """``signing_key``: namespaces and handoffs only from tokens signed with it (None: as sent)."""
        self.setup = setup
        self._trust = None if signing_key is None else \
            Trust(signing_key, refuse_unsigned=setup.config.signing.unsigned == "refuse")
        self.lock = threading.RLock()
        self.metrics = metrics
        disk_entries = setup.disk_capacity_entries if setup.disk_dir is not None else None
        self.manager = KVManager.open(setup.config, setup.num_slots, setup.chunk_tokens, setup.chunk_bytes,
                                      setup.world_size, disk_entries, initial_disk, metrics, remote)
        self._last_step_tokens = 0  # tokens scheduled in the step whose report comes next
        self.requests: dict[str, RequestState] = {}
        self._loads: list[LoadOp] = []
        self._async_loads: list[AsyncLoad] = []
        self._loaded_owners: list[str] = []
        self._delayed_frees: list[str] = []
        self.blocks = RequestBlocks(1 if setup.groups is None else setup.groups.num_groups)
        # namespace digests by (tenant, salt), most recent last; bounded: every request may bring a new salt
        self._digests: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._no_cache = frozenset(filter(None, setup.config.no_cache_namespaces.split(",")))
        remote_deadline_s = setup.config.remote.timeout_ms / 1000
        self._async_deadline_s = DISK_LOAD_DEADLINE_S if remote is None else max(remote_deadline_s, 0.001)
        self._events: KVEvents | None = None  # vLLM KV events, when published

    @property
    def store(self) -> TieredStore:
        return self.manager.store

    @property
    def remote(self) -> RemoteTier | None:
        return self.manager.remote

    # ----- lookup ----------------------------------------------------------------------------
    @_locked
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """The tokens kvtier can give beyond vLLM's own ``num_computed_tokens`` (None: ask again)
        and whether they load asynchronously."""
        started = time.perf_counter()
        state = self._state(request)
        if state.planned is not None:  # vLLM could not allocate for the last answer: plan afresh
            self.manager.cancel_load(request.request_id, state.planned)
            state.planned = None
        if not state.controls.load:
            return 0, False
        answer = self._lookup(state, num_computed_tokens)
        self.metrics.lookup_seconds.observe(time.perf_counter() - started)
        return answer

    def _lookup(self, state: RequestState, num_local: int) -> tuple[int | None, bool]:
        prompt = state.request.prompt_token_ids or []
        block, chunk = self.setup.layout.block_size, self.setup.chunk_tokens
        max_hit = (len(prompt) - 1) // block * block
        all_keys = self._keys(state, prompt)
        keys = all_keys[: -(-max_hit // chunk)]
        first = num_local // chunk  # chunks before this one are in vLLM's own cache
        expect = state.controls.expect_tokens // chunk
        # checked against every whole chunk of the prompt: the last one may lie beyond what can hit
        # (the last token is always computed), and the manager clamps the wait to ``keys``
        if state.controls.handoff_prompt_id and not _names_prompt(state.controls.handoff_prompt_id, all_keys,
                                                                  expect):
            logger.warning("kvtier: request %s carries a handoff signed for another prompt; it is ignored",
                           state.request.request_id)
            expect = 0
        planned = self.manager.plan_load(LoadRequest(state.request.request_id, state.controls.namespace, keys, first,
                                                     expect))
        if planned is None:
            return None, False
        hit = min((first + planned.num_chunks) * chunk, max_hit)
        if self.setup.groups is not None:  # ends where every group's chunks hold what the load needs
            hit = self.setup.groups.load_end(hit)
        if hit <= num_local:
            self.manager.cancel_load(state.request.request_id, planned)
            return 0, False
        state.planned, state.first_chunk, state.num_local_tokens = planned, first, num_local
        return hit - num_local, planned.is_async

    @_locked
    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is None or state.planned is None:
            return
        planned, state.planned = state.planned, None
        if num_external_tokens == 0:
            self.manager.cancel_load(request.request_id, planned)
            return
        tables = blocks.get_block_ids()
        block_ids = tables[0]
        block, per_chunk = self.setup.layout.block_size, self.setup.blocks_per_chunk
        start = state.num_local_tokens // block
        end = (state.num_local_tokens + num_external_tokens) // block
        groups = self.setup.groups
        loads: list[LoadOp] = []
        for chunk_index in range(start // per_chunk, -(-end // per_chunk)):
            slot = planned.slots[chunk_index - state.first_chunk]
            if groups is not None:  # one run per group; a sliding window's only where it reaches
                runs = groups.chunk_load_runs(chunk_index, start, end * block, tables)
                full = runs[groups.full_index]
                loads.append(LoadOp(slot, full.first_block, full.block_ids, runs))
                continue
            lo, hi = max(start, chunk_index * per_chunk), min(end, (chunk_index + 1) * per_chunk)
            loads.append(LoadOp(slot, lo - chunk_index * per_chunk, tuple(block_ids[lo:hi])))
        if planned.is_async:
            self._async_loads.append(AsyncLoad(request.request_id, planned.disk, planned.remote, tuple(loads),
                                               self._async_deadline_s))
            state.loading = True
        else:
            self._loads += loads
            self._loaded_owners.append(request.request_id)

    # ----- per step --------------------------------------------------------------------------
    @_locked
    def build_plan(self, scheduler_output: "SchedulerOutput") -> StepPlan:
        self._last_step_tokens = scheduler_output.total_num_scheduled_tokens
        self.blocks.update(scheduler_output)
        plan = StepPlan()
        for new in scheduler_output.scheduled_new_reqs:
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            self._plan_stores(new.req_id, new.num_computed_tokens, scheduled, plan)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens):
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._plan_stores(req_id, num_computed, scheduled, plan)
        plan.loads, self._loads = self._loads, []
        plan.async_loads, self._async_loads = self._async_loads, []
        plan.delayed_frees, self._delayed_frees = self._delayed_frees, []
        for owner in self._loaded_owners:  # slots are safe: the loads run before this step's stores
            self.manager.load_finished(owner)
        self._loaded_owners = []
        plan.preempted = sorted(scheduler_output.preempted_req_ids or ())
        for req_id in plan.preempted:
            self.manager.load_finished(req_id)
        ops = self.manager.take_ops()
        plan.spills, plan.write_through, plan.deletes, plan.purges, plan.invalidations = \
            ops.spills, ops.write_through, ops.deletes, ops.purges, ops.invalidations
        return plan

    def _plan_stores(self, req_id: str, num_computed: int, num_scheduled: int, plan: StepPlan) -> None:
        """Plan the stores of the chunks ``req_id`` completes by the end of this step (``num_computed``
        tokens before it, ``num_scheduled`` in it)."""
        num_computed_after = num_computed + num_scheduled
        state = self.requests.get(req_id)
        if state is None or not state.controls.store:
            return
        request = state.request
        tokens = request.all_token_ids if self.setup.config.store_decode_tokens else request.prompt_token_ids
        tokens = tokens or []
        num_full = min(num_computed_after, len(tokens)) // self.setup.chunk_tokens
        if num_full <= state.num_store_checked:
            return
        keys = self._keys(state, tokens)
        block_ids = self.blocks.of(req_id)
        groups = self.setup.groups
        tables = self.blocks.groups_of(req_id)
        per_chunk = self.setup.blocks_per_chunk
        for i in range(state.num_store_checked, num_full):
            runs = None if groups is None else groups.store_runs(i, tables, num_computed)
            if groups is not None and runs is None:
                continue  # a block its windows need is gone, or may be (vLLM freed it on num_computed)
            planned = self.manager.plan_store(keys[i], state.controls.namespace)
            if planned is None:
                continue
            slot, upload = planned
            plan.stores.append(StoreOp(keys[i], slot, tuple(block_ids[i * per_chunk:(i + 1) * per_chunk]), req_id,
                                       runs or ()))
            state.store_keys.append(keys[i])
            if upload is not None:
                plan.remote_puts.append(upload)
        state.num_store_checked = num_full

    @_locked
    def complete(self, report: WorkerReport | None, finished_loads: set[str]) -> None:
        """Apply a step's output: the workers' report, and the requests whose asynchronous loads
        the workers finished (``finished_recving``)."""
        if report is not None:
            self.manager.complete(report, self._last_step_tokens)
        for req_id in finished_loads:
            state = self.requests.get(req_id)
            if state is not None:
                state.loading = False
                self.manager.load_finished(req_id)
            else:  # finished (aborted) while loading: vLLM kept its blocks until now
                self.manager.release(req_id)

    @_locked
    def enable_events(self, int_hashes: bool, token_files: ChunkTokenFiles | None) -> None:
        """Record every tier's stored and removed chunks for vLLM's KV events (``take_events``);
        ``int_hashes``: block hashes as vLLM publishes its own (64-bit integers, or bytes);
        ``token_files``: the disk tier's tokens files (its entries are announced from them, and
        kept for every chunk it stores), None without a disk tier."""
        disk = self.store.disk_books if token_files is not None else None
        self._events = KVEvents(self.setup.chunk_tokens, self.setup.num_slots + EXTRA_CHUNKS, int_hashes, disk,
                                token_files)
        self.manager.record_events(self._events.log)

    @_locked
    def take_events(self) -> list["KVCacheEvent"]:
        """The tiers' stored and removed chunks since the last call, as vLLM KV events."""
        return [] if self._events is None else self._events.take()

    def shutdown(self) -> None:
        self.manager.close()
        if self._events is not None:
            self._events.close()

    @_locked
    def request_finished(self, request: "Request") -> tuple[bool, dict[str, object] | None]:
        """Forget the request. Returns whether vLLM must keep its blocks until the worker reports
        its in-flight stores done (stores copy asynchronously and must not read reused blocks),
        and, on a prefill instance (``kv_role: kv_producer``) that uploads to a remote tier or serves
        peers (``p2p.listen``), the handoff a
        decode instance needs: ``{"kvtier": {"expect_tokens": N}}`` (plus the namespace, when the
        request named one), which the client or proxy passes on in ``kv_transfer_params``.
        A request finished while its asynchronous load is in flight keeps its leases until the
        worker reports the load finished (vLLM keeps its blocks until then)."""
        state = self.requests.pop(request.request_id, None)
        self.blocks.forget([request.request_id])
        if state is not None and state.planned is not None:
            self.manager.cancel_load(request.request_id, state.planned)
        if state is None or not state.loading:
            self.manager.release(request.request_id)
        delay = state is not None and any(self.store.is_pending(key) for key in state.store_keys)
        if delay:
            self._delayed_frees.append(request.request_id)
        return delay, self._handoff(state)

    def _handoff(self, state: RequestState | None) -> dict[str, object] | None:
        if state is None or not self.setup.producer or not state.controls.store:
            return None
        uploads = self.remote is not None and self.remote.stores_uploads
        if not uploads and self.setup.config.p2p.listen is None:
            return None  # a decode instance could find the chunks nowhere
        num_tokens = len(state.request.prompt_token_ids or []) // self.setup.chunk_tokens * self.setup.chunk_tokens
        if not num_tokens:
            return None
        section: dict[str, object] = {"expect_tokens": num_tokens}
        if self._trust is not None:
            keys = self._keys(state, state.request.prompt_token_ids or [])
            last_key = keys[num_tokens // self.setup.chunk_tokens - 1]
            claim = HandoffClaim(state.controls.namespace, num_tokens, prompt_id_of(last_key),
                                 int(time.time()) + HANDOFF_TTL_S)
            section["handoff"] = sign_handoff(self._trust.key, claim)
        elif state.controls.namespace != self.setup.config.namespace:
            section["namespace"] = state.controls.namespace
        return {"kvtier": section}

    # ----- helpers ---------------------------------------------------------------------------
    def _state(self, request: "Request") -> RequestState:
        state = self.requests.get(request.request_id)
        if state is None:
            binding = content_binding(getattr(request, "lora_request", None), getattr(request, "mm_features", None),
                                      getattr(request, "prompt_embeds", None))
            if binding is None:
                logger.warning("kvtier: request %s has prompt embeddings, which kvtier cannot key: served "
                               "without kvtier", request.request_id)
            controls = request_controls(request.kv_transfer_params, request.cache_salt, self.setup.config.namespace,
                                        self._no_cache, binding, self._trust, time.time())
            state = self.requests[request.request_id] = RequestState(request, controls=controls)
        return state

    def _digest(self, controls: RequestControls) -> bytes:
        """Namespace digest of a request's tenant and salt (the most recent ``DIGEST_CACHE_SIZE``
        cached: clients may send a new ``cache_salt`` with every request)."""
        name = (controls.namespace, controls.salt)
        digest = self._digests.get(name)
        if digest is not None:
            self._digests.move_to_end(name)
            return digest
        digest = replace(self.setup.namespace, tenant=controls.namespace, salt=controls.salt).digest()
        self._digests[name] = digest
        if len(self._digests) > DIGEST_CACHE_SIZE:
            self._digests.popitem(last=False)
        return digest

    def _keys(self, state: RequestState, tokens: list[int]) -> list[bytes]:
        """Chunk keys of ``tokens``, extending the cached chain as the request grows."""
        num_full = len(tokens) // self.setup.chunk_tokens
        if len(state.keys) < num_full:
            parent = state.keys[-1] if state.keys else None
            more = chunk_keys(self._digest(state.controls), tokens, self.setup.chunk_tokens,
                              start=len(state.keys), parent=parent)
            if self._events is not None:  # the tokens and adapter of each key, for its stored events
                chunk, adapter = self.setup.chunk_tokens, adapter_of(state.request)
                for index, key in enumerate(more, start=len(state.keys)):
                    self._events.chunks.remember(key.digest, parent, tokens[index * chunk:(index + 1) * chunk],
                                                 adapter)
                    parent = key.digest
            state.keys.extend(key.digest for key in more)
        return state.keys


def _names_prompt(prompt_id: str, keys: list[bytes], expect_chunks: int) -> bool:
    """Whether a signed handoff's ``prompt_id`` is this prompt's (its last announced chunk's key)."""
    return 0 < expect_chunks <= len(keys) and prompt_id == prompt_id_of(keys[expect_chunks - 1])
