"""Start-up refusal of models whose layers keep a recurrent state (Mamba, Mamba-2, short
convolutions, linear attention and gated delta nets: vLLM's ``MambaSpec`` KV cache groups).

Such a layer does not keep one K and V per token: it keeps a fixed-size state per request that
every token updates in place, and the state after a chunk depends on every token before it.
kvtier's chunks are per-token KV pages; it does not save and restore a state at chunk boundaries,
so it could not resume such a prompt from its tiers. It stops the engine at start-up instead,
with an error naming the model type and its state layers: never silent zero hits (issue 14 #2).
Checked twice: from the model's config when vLLM first asks the connector for its KV layout
(``get_required_kvcache_layout``, in the engine core before the KV cache is sized; vLLM fails on
its own right after, with an error that names neither the model nor kvtier, when it turned its
hybrid manager off for a connector without hybrid support), and from the KV cache groups when the
connector is built (``build_setup``).
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.v1.kv_cache_interface import KVCacheSpec, MambaSpec

from kvtier.errors import LayoutError


def refuse_recurrent_state(model_type: str, specs: Sequence[KVCacheSpec], has_inner_state: bool) -> None:
    """Raise ``LayoutError`` naming ``model_type`` when one of the KV cache groups' ``specs`` is a
    recurrent state (``MambaSpec``), or the model says it keeps one (``has_inner_state``, vLLM's
    flag for Mamba-like models); return otherwise."""
    states = sorted({_state_name(spec) for spec in specs if isinstance(spec, MambaSpec)})
    if not states and not has_inner_state:
        return
    layers = f" ({', '.join(states)})" if states else ""
    raise LayoutError(
        f"kvtier does not support model type {model_type!r}: its recurrent-state layers{layers} (Mamba or "
        "linear attention) keep one state per request that every token updates in place, not one K and V per "
        "token, so chunks of KV cannot resume a prompt and kvtier does not store states at chunk boundaries. "
        "Serve this model without kvtier's connector (no --kv-transfer-config), or use vLLM's own prefix cache")


def _state_name(spec: MambaSpec) -> str:
    """The kind of state a group keeps, by vLLM's backend name (e.g. ``MAMBA2``, ``GDN_ATTN``)."""
    kind = getattr(spec.mamba_type, "name", None)
    return str(kind) if kind else type(spec).__name__
