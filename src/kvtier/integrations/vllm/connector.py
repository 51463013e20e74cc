"""``KVTierConnector``: the thin vLLM v1 connector. It picks the scheduler-side or the worker-side
delegate by role and translates vLLM's calls; all logic lives in ``scheduler.py`` and ``worker.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvtier.integrations.vllm.compat import (REQUIRED_KV_CACHE_LAYOUT, attention_backend, check_version,
                                              hybrid_supported, layer_hooks_run)
from kvtier.integrations.vllm.events import events_enabled, int_block_hashes
from kvtier.integrations.vllm.setup import build_setup
from kvtier.integrations.vllm.state_layers import refuse_recurrent_state
from kvtier.integrations.vllm.stats import KVTierPromMetrics, KVTierStats, StatsSource, build_stats
from kvtier.metrics import Metrics
from kvtier.plans import StepPlan, WorkerReport

if TYPE_CHECKING:
    from kvtier.integrations.vllm.peers import PeerService
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier")


class KVTierMetadata(KVConnectorMetadata):
    """Scheduler -> worker: the plan of one engine step."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: what the worker did since its last report."""

    def __init__(self, report: WorkerReport) -> None:
        self.report = report

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVTierWorkerMetadata)
        return KVTierWorkerMetadata(self.report.aggregate(other.report))


if TYPE_CHECKING or hybrid_supported():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults, SupportsHMA

    _HYBRID_BASES: tuple[type, ...] = (SupportsHMA,)  # vLLM keeps its hybrid KV cache manager on
else:
    _HYBRID_BASES = ()


class KVTierConnector(KVConnectorBase_V1, *_HYBRID_BASES):  # type: ignore[misc]
    """kvtier's KV connector for vLLM v1 (role SCHEDULER in EngineCore, WORKER in each worker).
    Where vLLM reports failed loads by request, it declares ``SupportsHMA``: models with several KV
    cache groups (sliding-window and full attention) run with the hybrid allocator on."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        check_version()
        super().__init__(vllm_config, role, kv_cache_config)
        setup = build_setup(vllm_config, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        if transfer is not None and transfer.kv_load_failure_policy != "recompute":
            # kvtier is a cache: a chunk that fails to load is recomputed, never an error for the
            # request. vLLM reads this after building the scheduler-side connector.
            transfer.kv_load_failure_policy = "recompute"
        self._scheduler = None
        self._worker = None
        self._admin = None
        self._peers: "PeerService | None" = None
        self._stats: StatsSource | None = None
        if role == KVConnectorRole.SCHEDULER:
            from kvtier.integrations.vllm.scheduler import SchedulerSide
            from kvtier.tiers.disk_tokens import ChunkTokenFiles
            from kvtier.integrations.vllm.startup import open_remote_tier, open_sealer, open_signing_key, scan_disk, \
                serve_admin, serve_metrics

            metrics = Metrics()
            sealer = open_sealer(setup)
            serve_metrics(metrics, setup)
            self._scheduler = SchedulerSide(setup, scan_disk(setup, metrics, sealer), metrics,
                                            open_remote_tier(setup, sealer), open_signing_key(setup))
            self._admin = serve_admin(self._scheduler, setup)
            if events_enabled(vllm_config):
                token_files = ChunkTokenFiles(setup.disk_dir, sealer) if setup.disk_dir is not None else None
                self._scheduler.enable_events(int_block_hashes(), token_files)
            self._stats = StatsSource(self._scheduler)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from kvtier.integrations.vllm.startup import open_remote_tier, open_sealer
            from kvtier.integrations.vllm.worker import WorkerSide

            from kvtier.integrations.vllm.peers import serve_peers

            sealer = open_sealer(setup)
            rank = get_tensor_model_parallel_rank()
            # reads and uploads on separate clients: a failing upload (a full Redis) must not
            # mark the tier unhealthy for reads
            self._worker = WorkerSide(setup, rank, open_remote_tier(setup, sealer), sealer,
                                      open_remote_tier(setup, sealer))
            self._peers = serve_peers(setup, rank, self._worker.disk)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        # vLLM asks this in the engine core before it sizes the KV cache: the first point where a
        # model kvtier cannot serve is refused with kvtier's reason (with the hybrid manager off,
        # where a version has no SupportsHMA, vLLM's own check fails later, naming neither the
        # model nor kvtier; with it on, a recurrent state would otherwise meet kvtier's chunks)
        model = vllm_config.model_config
        if model is not None:
            refuse_recurrent_state(str(model.hf_config.model_type), [], bool(model.has_inner_state))
        return REQUIRED_KV_CACHE_LAYOUT  # the layout kvtier's keys are made for (checked at registration)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is only a future miss

    # ----- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        backend = attention_backend(self._vllm_config, self._worker.setup.layer_names)
        self._worker.register_kv_caches(kv_caches, backend)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            assert isinstance(connector_metadata, KVTierMetadata)
            self._worker.begin_step(connector_metadata.plan)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load(self._plan(), layer_hooks_run(forward_context, self._worker.setup.layer_names))

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_layer(layer_name)  # memory loads pipelined by layer (CUDA); else nothing to wait for

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # whole chunks are saved once per step in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.save(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        return self._worker.finished_frees() or None, self._worker.finished_loads() or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> "KVConnectorTransferResults":
        """``get_finished``, and the requests whose whole load failed (several KV cache groups:
        block ids are unique within a group only, so vLLM takes a failure by request)."""
        results = super().get_transfer_results(finished_req_ids)
        assert self._worker is not None
        results.failed_recving |= self._worker.take_failed_loads()
        return results

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_load_errors()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None and isinstance(kv_connector_metadata, KVTierMetadata)
        self._worker.handle_preemptions(kv_connector_metadata.plan)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self._worker is not None
        report = self._worker.take_report()
        return None if report is None else KVTierWorkerMetadata(report)

    def shutdown(self) -> None:
        if self._peers is not None:
            self._peers.close()
        if self._worker is not None:
            self._worker.shutdown()
        if self._admin is not None:
            self._admin.close()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierMetadata)
        return meta.plan

    # ----- kvtier's metrics on vLLM's /metrics (stats.py) ------------------------------------
    def get_kv_connector_stats(self) -> KVTierStats | None:
        return None if self._stats is None else self._stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, object] | None = None) -> KVTierStats:
        return build_stats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVTierPromMetrics:
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ----- scheduler side --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return KVTierMetadata(self._scheduler.build_plan(scheduler_output))

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._scheduler is not None
        meta = connector_output.kv_connector_worker_meta
        report = meta.report if isinstance(meta, KVTierWorkerMetadata) else None
        self._scheduler.complete(report, set(connector_output.finished_recving or ()))
        if self._stats is not None:
            self._stats.record(report)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request)

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """``request_finished`` with the hybrid allocator on (``SupportsHMA``): the same, for every group."""
        assert self._scheduler is not None
        return self._scheduler.request_finished(request)

    def take_events(self) -> Iterable["KVCacheEvent"]:
        """kvtier's tiers as KV events (``integrations/vllm/events.py``); vLLM publishes them."""
        return () if self._scheduler is None else self._scheduler.take_events()
