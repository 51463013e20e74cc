"""The worker reports how its background upload queue's length changed (``WorkerReport``'s
``*_queue_delta``), from which the scheduler keeps ``kvtier_queue_depth``: uploads held up by a
stalled server show in the report, and leave it once the server lets them through."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kvtier.plans import SlotOp, StepPlan, StoreOp, WorkerReport
from tests.dict_tier import DictTier
from tests.unit.test_worker_async import NS, worker


class StalledTier(DictTier):
    """A remote whose writes wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def _put_new(self, name: str, header: bytes, payload: memoryview, ttl_s: int | None) -> bool:
        self.release.wait(10)
        return super()._put_new(name, header, payload, ttl_s)


@pytest.fixture
def stalled() -> Iterator[StalledTier]:
    tier = StalledTier()
    yield tier
    tier.release.set()


def test_queued_uploads_are_reported_as_they_come_and_go(stalled: StalledTier) -> None:
    side, _ = worker(DictTier(), upload_remote=stalled)
    keys = [bytes([n]) * 16 for n in range(3)]
    plan = StepPlan(stores=[StoreOp(key, slot, (2 * slot, 2 * slot + 1), "r1") for slot, key in enumerate(keys)],
                    remote_puts=[SlotOp(key, slot, NS) for slot, key in enumerate(keys)])
    side.begin_step(plan)
    side.start_load(plan)
    side.save(plan)
    first = side.take_report()
    assert first is not None and first.upload_queue_delta == 3 and first.disk_queue_delta == 0
    stalled.release.set()
    assert side.uploader is not None and side.uploader.flush(5)
    reports = [report for report in (side.take_report(), side.take_report()) if report is not None]
    total = WorkerReport()
    for report in reports:
        total = total.aggregate(report)
    assert total.upload_queue_delta == -3 and len(stalled.values) == 3
