"""The vLLM worker side's asynchronous loads, on CPU tensors laid out as vLLM-CPU's: reads run on
background threads; once settled, the verified chunks are copied into the engine's blocks and
the blocks of the first chunk that failed, and of every chunk after it, are load errors."""

from __future__ import annotations

import time

import torch

from kvtier.config import load_config
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.integrations.vllm.worker import WorkerSide
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.plans import AsyncLoad, LoadOp, SlotOp, StepPlan, StoreOp
from kvtier.tiers.remote import RemoteTier
from tests.dict_tier import DictTier

LAYOUT = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")
CHUNK = 32  # two blocks of 16
NUM_BLOCKS = 12
NS = "default"


def worker(remote: RemoteTier | None, upload_remote: RemoteTier | None = None) -> tuple[WorkerSide,
                                                                                       dict[str, torch.Tensor]]:
    config = load_config({"chunk_tokens": CHUNK}, {}).config
    setup = EngineSetup(config, LAYOUT, Namespace(NS, "m", LAYOUT.fingerprint(), 1), ("l0", "l1"), 1,
                        LAYOUT.chunk_bytes(CHUNK), 4, None, 0)
    side = WorkerSide(setup, 0, remote, None, upload_remote)
    caches = {name: torch.zeros(NUM_BLOCKS, 1, 16, 16, dtype=torch.bfloat16) for name in ("l0", "l1")}
    side.register_kv_caches(caches, "CPU_ATTN")
    return side, caches


def chunk_payload(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.chunk_bytes(CHUNK) // 2, generator=gen).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def wait_finished(side: WorkerSide, timeout_s: float = 5) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = side.finished_loads()
        if done:
            return done
        time.sleep(0.005)
    raise AssertionError("the load never settled")


def test_a_load_that_fails_half_way_fills_the_good_chunks_and_reports_the_rest() -> None:
    remote = DictTier()
    keys = [bytes([i]) * 16 for i in range(3)]
    remote.put(keys[0], 0, chunk_payload(0), LAYOUT.fingerprint(), namespace=NS)
    remote.put(keys[2], 0, chunk_payload(2), LAYOUT.fingerprint(), namespace=NS)  # keys[1] is missing
    side, caches = worker(remote)
    fills = tuple(SlotOp(key, slot, NS) for slot, key in enumerate(keys))
    loads = (LoadOp(0, 0, (5, 2)), LoadOp(1, 0, (7, 3)), LoadOp(2, 0, (9, 4)))
    side.start_load(StepPlan(async_loads=[AsyncLoad("r1", (), fills, loads, 5.0)]))
    assert wait_finished(side) == {"r1"}
    assert side.take_load_errors() == {7, 3, 9, 4}  # chunk 1 failed: it and everything after it
    assert side.take_load_errors() == set()
    # chunk 0 is in blocks 5 and 2: a slot holds [layers, blocks of the chunk, page] (vLLM-CPU pages)
    pages = torch.frombuffer(bytearray(chunk_payload(0)), dtype=torch.int16).view(2, 2, -1)
    for layer, name in enumerate(("l0", "l1")):
        for index, block in enumerate((5, 2)):
            assert torch.equal(caches[name][block].view(torch.int16).flatten(), pages[layer, index])
        for block in (7, 3, 9, 4):  # failed: nothing copied
            assert not caches[name][block].view(torch.int16).any()
    report = side.take_report()
    assert report is not None
    assert sorted(report.promoted) == [keys[0], keys[2]] and report.promote_failed == [keys[1]]
    side.shutdown()


def test_the_engine_thread_never_waits_for_a_stalled_remote() -> None:
    remote = DictTier()
    key = b"\x07" * 16
    remote.put(key, 0, chunk_payload(7), LAYOUT.fingerprint(), namespace=NS)
    remote.delay_s = 1.0
    side, caches = worker(remote)
    started = time.monotonic()
    side.start_load(StepPlan(async_loads=[AsyncLoad("r1", (), (SlotOp(key, 0, NS),), (LoadOp(0, 0, (1, 2)),), 0.3)]))
    assert side.finished_loads() == set()
    assert time.monotonic() - started < 0.2  # start_load and get_finished returned at once
    assert wait_finished(side) == {"r1"}  # settled at the deadline, long before the server answers
    assert time.monotonic() - started < 0.9
    assert side.take_load_errors() == {1, 2}
    assert caches["l0"][1].abs().sum() == 0  # nothing was copied into the engine's blocks
    report = side.take_report()
    assert report is None or key not in report.promoted + report.promote_failed  # the read is still running
    assert side.fills is not None and side.fills.wait_idle(5)
    report = side.take_report()
    assert report is not None and report.promoted == [key]  # its slot is reported once the read ends
    side.shutdown()


def test_delayed_frees_are_released_on_a_step_without_a_forward() -> None:
    # vLLM 0.26 skips wait_for_save on steps with no work; the plan is still bound and get_finished
    # still runs, so a finished request's blocks must come back there (else reset_prefix_cache fails)
    side, _ = worker(DictTier())
    side.begin_step(StepPlan(delayed_frees=["r9"]))
    assert side.finished_frees() == {"r9"}
    assert side.finished_frees() == set()


class _NeverDone:
    """A store copy still in flight on the GPU (as ``torch.cuda.Event.query`` would say)."""

    def query(self) -> bool:
        return False


def test_only_a_preemption_of_a_request_with_stores_in_flight_waits_for_them(monkeypatch) -> None:
    # vLLM 0.26 calls handle_preemptions on every step: waiting there each time held every step
    # behind the last one's store copies (+6% TTFT on the H200 with no reuse at all)
    side, _ = worker(DictTier())
    assert side.mover is not None
    waits: list[int] = []
    monkeypatch.setattr(side.mover, "mark_stores", lambda: _NeverDone())
    monkeypatch.setattr(side.mover, "wait", lambda: waits.append(1))
    side.save(StepPlan(stores=[StoreOp(b"k" * 16, 0, (1, 2), "r1")]))
    side.handle_preemptions(StepPlan())
    side.handle_preemptions(StepPlan(preempted=["r2"]))
    assert waits == []
    side.handle_preemptions(StepPlan(preempted=["r1"]))
    assert waits == [1]


def test_an_invalidation_reaches_the_upload_queue_on_a_step_without_a_forward() -> None:
    from kvtier.plans import Invalidation

    remote = DictTier()
    assert remote.put(b"k" * 16, 0, chunk_payload(1), LAYOUT.fingerprint(), namespace=NS)
    side, _ = worker(remote)
    side.begin_step(StepPlan(invalidations=[Invalidation(NS, None)]))  # no save(): vLLM 0.26 idle step
    assert side.uploader is not None and side.uploader.flush(5)
    assert not remote.values  # deleted behind the (empty) upload queue
