"""The load-or-recompute decision follows measured rates."""

from __future__ import annotations

from kvtier.costmodel import CostModel, Rate


def test_unmeasured_fetches_are_assumed_to_pay() -> None:
    assert CostModel(256).fetch_pays(10**12, 1)


def test_slow_remote_loses_to_fast_prefill() -> None:
    model = CostModel(256)
    model.observe_step(2000, 1.0)  # 2,000 tokens/s
    model.observe_fetch(100 * 10**6, 1.0)  # 100 MB/s
    chunk_bytes, chunk_tokens = 6 * 10**6, 256
    assert model.fetch_pays(chunk_bytes, chunk_tokens)  # 60 ms vs 128 ms
    model.observe_fetch(10 * 10**6, 1.0)
    for _ in range(30):
        model.observe_fetch(10 * 10**6, 1.0)  # the network slows to 10 MB/s
    assert not model.fetch_pays(chunk_bytes, chunk_tokens)  # 600 ms vs 128 ms


def test_decode_steps_do_not_count_as_prefill() -> None:
    model = CostModel(256)
    model.observe_step(8, 0.05)
    assert model.prefill_tokens.per_s is None


def test_rate_ignores_empty_observations() -> None:
    rate = Rate()
    rate.observe(0, 1.0)
    rate.observe(10, 0.0)
    assert rate.per_s is None
    rate.observe(10, 2.0)
    assert rate.per_s == 5.0
