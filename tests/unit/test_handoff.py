"""Disaggregated-prefill handoff on the scheduler side: a decode instance waits (bounded) for the
chunks a prefill instance announced; a prefill instance announces them.

The engine end to end (two vLLM engines and Redis) is tests/e2e/test_remote_sharing.py; here the
remote is a DictTier, so the test decides when chunks "arrive".
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from kvtier.config import load_config
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.manager import HANDOFF_POLL_S
from kvtier.metrics import Metrics
from tests.dict_tier import DictTier

LAYOUT = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")
CHUNK = 256
PROMPT = list(range(100, 100 + 4 * CHUNK + 10))


def side(remote: DictTier | None, wait_ms: int = 5000, producer: bool = False, cost_gate: bool = True,
         extra: dict | None = None) -> SchedulerSide:
    config = load_config({"remote.handoff_wait_ms": wait_ms, "chunk_tokens": CHUNK, "remote.cost_gate": cost_gate,
                          **(extra or {})}, {"PEER_SECRET": "00" * 32}).config
    setup = EngineSetup(config, LAYOUT, Namespace("default", "m", LAYOUT.fingerprint(), 1), ("l0", "l1"), 1,
                        LAYOUT.chunk_bytes(CHUNK), 16, None, 0, producer)
    return SchedulerSide(setup, [], Metrics(), remote)


def request(kvtier: dict | None, request_id: str = "r1") -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=PROMPT, cache_salt=None,
                           kv_transfer_params=None if kvtier is None else {"kvtier": kvtier})


def arrive(remote: DictTier, scheduler: SchedulerSide, *chunks: int) -> None:
    """The prefill instance's uploads of ``chunks`` land in the remote."""
    keys = scheduler.requests["r1"].keys
    for chunk in chunks:
        assert remote.put(keys[chunk], 0, bytes(LAYOUT.chunk_bytes(CHUNK)), LAYOUT.fingerprint(), namespace="default")


def handoffs(scheduler: SchedulerSide, outcome: str) -> float:
    for line in scheduler.metrics.exposition().decode().splitlines():
        if line.startswith(f'kvtier_handoffs_total{{outcome="{outcome}"}} '):
            return float(line.split()[-1])
    return 0.0


def ask(scheduler: SchedulerSide, req: SimpleNamespace, settle_s: float = 0.5) -> tuple[int | None, bool]:
    """The scheduler's answer once the remote's answer is in (the lookup runs on a background
    thread: an answer of None may only mean "not back yet"); None answers for ``settle_s``."""
    deadline = time.monotonic() + settle_s
    while True:
        time.sleep(HANDOFF_POLL_S * 1.5)
        answer = scheduler.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
        if answer[0] is not None or time.monotonic() >= deadline:
            return answer


def planned_chunks(scheduler: SchedulerSide) -> int:
    planned = scheduler.requests["r1"].planned
    return 0 if planned is None else planned.num_chunks


def test_a_decode_request_waits_until_every_announced_chunk_arrived() -> None:
    remote = DictTier()
    scheduler = side(remote)
    req = request({"expect_tokens": 4 * CHUNK})
    assert ask(scheduler, req) == (None, False)  # nothing there yet: wait
    arrive(remote, scheduler, 0, 1)
    assert ask(scheduler, req) == (None, False)  # half of it: still waiting, nothing fetched yet
    assert planned_chunks(scheduler) == 0
    arrive(remote, scheduler, 2, 3)
    assert ask(scheduler, req) == (4 * CHUNK, True)  # all there: four fetches, loaded asynchronously
    assert len(scheduler.requests["r1"].planned.remote) == 4
    assert handoffs(scheduler, "complete") == 1 and handoffs(scheduler, "timeout") == 0


def test_the_wait_is_bounded_and_then_loads_what_arrived() -> None:
    remote = DictTier()
    scheduler = side(remote, wait_ms=100)
    req = request({"expect_tokens": 4 * CHUNK})
    assert ask(scheduler, req, settle_s=0) == (None, False)
    arrive(remote, scheduler, 0)
    assert ask(scheduler, req, settle_s=5) == (CHUNK, True)  # gave up waiting: loads the one chunk there
    assert planned_chunks(scheduler) == 1
    assert handoffs(scheduler, "timeout") == 1 and handoffs(scheduler, "complete") == 0


def test_the_remote_is_asked_at_most_once_per_poll_interval() -> None:
    remote = DictTier()
    scheduler = side(remote)
    req = request({"expect_tokens": 4 * CHUNK})
    assert ask(scheduler, req) == (None, False)
    asked = remote.num_prefix_queries
    for _ in range(20):
        assert scheduler.get_num_new_matched_tokens(req, 0) == (None, False)  # type: ignore[arg-type]
    assert remote.num_prefix_queries <= asked + 1


def test_without_a_handoff_nothing_waits() -> None:
    remote = DictTier()
    scheduler = side(remote)
    assert ask(scheduler, request(None)) == (0, False)  # the remote holds nothing: computed at once
    assert ask(scheduler, request({"expect_tokens": 0}, "r2")) == (0, False)
    assert handoffs(scheduler, "complete") == handoffs(scheduler, "timeout") == 0


def test_a_prefill_instance_announces_the_chunks_it_stored() -> None:
    producer = side(DictTier(), producer=True)
    for req, expected in ((request(None), {"kvtier": {"expect_tokens": 4 * CHUNK}}),
                          (request({"namespace": "tenant-a"}, "r2"),
                           {"kvtier": {"expect_tokens": 4 * CHUNK, "namespace": "tenant-a"}}),
                          (request({"store": False}, "r3"), None)):
        ask(producer, req)
        assert producer.request_finished(req) == (False, expected)  # type: ignore[arg-type]
    consumer = side(DictTier())
    ask(consumer, request(None))
    assert consumer.request_finished(request(None)) == (False, None)  # type: ignore[arg-type]


def test_a_prefill_instance_that_serves_peers_announces_without_a_remote_tier() -> None:
    """Disaggregated prefill over P2P: no remote tier, but ``p2p.listen``: the decode instance
    fetches the chunks from this instance's peer server. Without either, nothing is announced."""
    peer = {"p2p.listen": "127.0.0.1:7070", "p2p.key_env": "PEER_SECRET", "disk.path": "/tmp/unused"}
    for extra, expected in ((peer, {"kvtier": {"expect_tokens": 4 * CHUNK}}), ({}, None)):
        producer = side(None, producer=True, extra=extra)
        ask(producer, request(None))
        assert producer.request_finished(request(None)) == (False, expected)  # type: ignore[arg-type]


def test_the_cost_gate_skips_a_fetch_slower_than_recomputing_unless_turned_off() -> None:
    for gate, expected in ((True, (0, False)), (False, (4 * CHUNK, True))):
        remote = DictTier()
        scheduler = side(remote, cost_gate=gate)
        ask(scheduler, request(None))  # computes the keys
        arrive(remote, scheduler, 0, 1, 2, 3)
        scheduler.request_finished(request(None))  # type: ignore[arg-type]
        scheduler.manager.cost.observe_step(4096, 0.01)  # the engine prefills 409,600 tokens/s
        scheduler.manager.cost.observe_fetch(1 << 20, 1.0)  # the remote delivers 1 MiB/s
        assert ask(scheduler, request(None, "r2")) == expected
        skipped = [line for line in scheduler.metrics.exposition().decode().splitlines()
                   if line.startswith('kvtier_skipped_loads_total{tier="remote"}')]
        assert skipped == [f'kvtier_skipped_loads_total{{tier="remote"}} {4.0 if gate else 0.0}']


def test_the_digest_cache_is_bounded_whatever_salts_clients_send(monkeypatch) -> None:
    # a new cache_salt per request used to leave one cached digest each behind (50,000 salts: 20 MiB)
    import kvtier.integrations.vllm.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "DIGEST_CACHE_SIZE", 100)
    scheduler = side(None)  # type: ignore[arg-type]  # no remote tier: nothing to wait for
    for i in range(1000):
        req = SimpleNamespace(request_id=f"r{i}", prompt_token_ids=PROMPT[:300], cache_salt=f"salt-{i}",
                              kv_transfer_params=None)
        scheduler.get_num_new_matched_tokens(req, 0)
        scheduler.request_finished(req)
    assert len(scheduler._digests) == 100
