"""Replay a workload through kvtier's own books: ``KVManager`` over ``TieredStore``, with the real
eviction policies, disk write policy and lookup rules, and no bytes.

Per request, in arrival order, the steps the vLLM connector takes (``integrations/vllm/scheduler``):
1. the engine's own cache gives ``engine_hit`` tokens (``engine.py``);
2. kvtier looks up the chunks from ``engine_hit // chunk_tokens`` up to the one holding the last
   loadable token (``(num_tokens - 1)`` rounded down to engine blocks) and plans a load; the
   request's prefix hit is ``max(engine_hit, min(end of the loaded chunks, that limit))``;
   With a remote tier (``remote.py``), the chunks after that run that the remote holds are read
   from it too (kvtier reads them into memory slots; the load-cost gate is taken as passing);
3. the load completes (disk chunks are promoted into memory slots), then every full chunk of the
   prompt is offered for storing (chunks memory holds are touched, not stored again; a new one
   is uploaded to the remote unless it holds it), the plan's disk writes complete, and the
   request is released.
Bytes follow from the chunk counts: a load copies its tokens out of memory (a disk or remote chunk
is read whole first), a store writes a whole chunk to memory (and with write-through to disk, and
to the remote when it lacks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.advisor.remote import RemoteModel
from kvtier.advisor.workload import Workload
from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.manager import KVManager, LoadRequest
from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport

_NAMESPACE = "advisor"


@dataclass(frozen=True)
class TierSizes:
    """kvtier's capacity in tokens: memory, disk (None: no disk tier) and remote (None: no remote
    tier; ``UNBOUNDED`` for a store that evicts nothing, such as S3 within its TTL)."""

    memory_tokens: int
    disk_tokens: int | None
    remote_tokens: int | None = None


UNBOUNDED = -1  # a remote tier's capacity: it evicts nothing


@dataclass(frozen=True)
class RequestOutcome:
    num_tokens: int
    engine_hit_tokens: int
    hit_tokens: int  # engine and kvtier together: the prefix the engine did not compute
    memory_tokens: int  # of hit_tokens, loaded by kvtier from memory
    disk_tokens: int  # ... and from disk (through a memory slot)
    remote_tokens: int = 0  # ... and from the remote tier (through a memory slot)


@dataclass(frozen=True)
class ReplayResult:
    sizes: TierSizes
    outcomes: tuple[RequestOutcome, ...]
    read_bytes: dict[str, int]  # per tier
    written_bytes: dict[str, int]
    evictions: dict[str, int]

    @property
    def hit_ratio_tokens(self) -> float:
        total = sum(o.num_tokens for o in self.outcomes)
        return sum(o.hit_tokens for o in self.outcomes) / total if total else 0.0

    @property
    def hit_ratio_mean_per_request(self) -> float:
        if not self.outcomes:
            return 0.0
        return sum(o.hit_tokens / o.num_tokens for o in self.outcomes) / len(self.outcomes)


@dataclass(frozen=True)
class KvtierSettings:
    chunk_tokens: int
    engine_block_tokens: int
    kv_bytes_per_token: int
    memory_policy: str  # "s3fifo" or "lru"
    disk_write_policy: str  # "write_through" or "spill"
    admission: str = "adaptive"  # admission.policy: "adaptive", "always" or "second_sight"


def _manager(settings: KvtierSettings, sizes: TierSizes, metrics: Metrics) -> KVManager:
    try:
        config = load_config({"memory.policy": settings.memory_policy,
                              "disk.write_policy": settings.disk_write_policy,
                              "admission.policy": settings.admission,
                              "chunk_tokens": settings.chunk_tokens}, {}).config
    except ConfigError as exc:
        raise ConfigError("--policy/--disk-write-policy/--admission", str(exc)) from None
    num_slots = max(1, sizes.memory_tokens // settings.chunk_tokens)
    disk_entries = None if sizes.disk_tokens is None else max(1, sizes.disk_tokens // settings.chunk_tokens)
    chunk_bytes = settings.chunk_tokens * settings.kv_bytes_per_token
    return KVManager.open(config, num_slots, settings.chunk_tokens, chunk_bytes, 1, disk_entries, [], metrics, None)


def replay(workload: Workload, engine_hits: list[int], settings: KvtierSettings, sizes: TierSizes) -> ReplayResult:
    """Replay every request of ``workload`` (see the module docstring)."""
    metrics = Metrics()
    manager = _manager(settings, sizes, metrics)
    remote = None if sizes.remote_tokens is None else RemoteModel(
        None if sizes.remote_tokens == UNBOUNDED else max(1, sizes.remote_tokens // settings.chunk_tokens))
    chunk, block = settings.chunk_tokens, settings.engine_block_tokens
    chunk_bytes = chunk * settings.kv_bytes_per_token
    read = {"memory": 0, "disk": 0, "remote": 0}
    written = {"memory": 0, "disk": 0, "remote": 0}
    outcomes = []
    for index, (request, engine_hit) in enumerate(zip(workload.requests, engine_hits)):
        owner = str(index)
        max_hit = (request.num_tokens - 1) // block * block
        keys = request.chunk_keys[:-(-max_hit // chunk)]
        first = engine_hit // chunk
        planned = manager.plan_load(LoadRequest(owner, _NAMESPACE, keys, first))
        assert planned is not None, "kvtier's own remote tier is not opened: a plan is never deferred"
        sources = list(planned.sources)
        if remote is not None and first + len(sources) < len(keys):
            sources += ["remote"] * remote.held_run(keys[first + len(sources):])
        hit = min((first + len(sources)) * chunk, max_hit)
        by_tier = {"memory": 0, "disk": 0, "remote": 0}
        if hit > engine_hit:
            for position, source in enumerate(sources):
                start = max(engine_hit, (first + position) * chunk)
                by_tier[source] += max(0, min(hit, (first + position + 1) * chunk) - start)
            read["disk"] += len(planned.disk) * chunk_bytes
            read["remote"] += sources.count("remote") * chunk_bytes
            read["memory"] += sum(by_tier.values()) * settings.kv_bytes_per_token
        if planned.num_chunks and hit > engine_hit:
            manager.complete(WorkerReport(promoted=[op.key for op in planned.disk]), 0)
            manager.load_finished(owner)
        else:
            manager.cancel_load(owner, planned)
        stored = [key for key in request.chunk_keys if manager.plan_store(key, _NAMESPACE) is not None]
        if remote is not None:
            written["remote"] += sum(remote.upload(key) for key in stored) * chunk_bytes
        ops = manager.take_ops()
        disk_writes = [op.key for op in (*ops.write_through, *ops.spills)]
        manager.complete(WorkerReport(stored=stored, disk_written=disk_writes), request.num_tokens)
        written["memory"] += len(stored) * chunk_bytes
        written["disk"] += len(disk_writes) * chunk_bytes
        manager.release(owner)
        outcomes.append(RequestOutcome(request.num_tokens, engine_hit, max(engine_hit, hit), by_tier["memory"],
                                       by_tier["disk"], by_tier["remote"]))
    evictions = {tier: int(metrics.registry.get_sample_value("kvtier_evictions_total", {"tier": tier}) or 0)
                 for tier in ("memory", "disk")}
    evictions["remote"] = 0 if remote is None else remote.num_evictions
    return ReplayResult(sizes, tuple(outcomes), read, written, evictions)


def num_distinct_chunks(workload: Workload) -> int:
    """Chunks an unbounded tier would end up holding: the capacity at which nothing is evicted."""
    return len({key for request in workload.requests for key in request.chunk_keys})
