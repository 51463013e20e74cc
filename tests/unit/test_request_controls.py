"""Per-request controls: namespace, store/load switches, cache salt; malformed input is safe."""

from __future__ import annotations

import pytest

from kvtier.integrations.vllm.requests import RequestControls, request_controls


def test_defaults_without_params() -> None:
    assert request_controls(None, None, "default") == RequestControls("default", True, True, "")


def test_namespace_switches_and_salt() -> None:
    params = {"kvtier": {"namespace": "tenant-a", "store": False, "load": True}}
    assert request_controls(params, "s1", "default") == RequestControls("tenant-a", True, False, "s1")


@pytest.mark.parametrize("section", [
    "tenant-a",  # not an object
    {"namespce": "a"},  # typo
    {"namespace": "a/b"},  # not a valid name
    {"namespace": ""},
    {"store": "no"},  # not a bool
    {"expect_tokens": -1},
    {"expect_tokens": True},
    {"expect_tokens": "512"},
    {"expect_tokens": 2**40},
])
def test_malformed_controls_disable_kvtier_for_the_request(section: object) -> None:
    controls = request_controls({"kvtier": section}, None, "default")
    assert controls.load is False and controls.store is False and controls.namespace == "default"


def test_no_cache_namespaces_never_load_or_store() -> None:
    params = {"kvtier": {"namespace": "secret"}}
    assert request_controls(params, None, "default", frozenset({"secret"})) == RequestControls("secret", False, False)
    assert request_controls(None, None, "secret", frozenset({"secret"})).store is False
    assert request_controls(params, None, "default", frozenset({"other"})).store is True


def test_a_handoff_names_the_tokens_to_wait_for() -> None:
    params = {"kvtier": {"namespace": "tenant-a", "expect_tokens": 512}}
    assert request_controls(params, None, "default") == RequestControls("tenant-a", True, True, "", 512)
    assert request_controls(None, None, "default").expect_tokens == 0
