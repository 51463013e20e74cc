"""The vLLM worker side against a real Redis: a full Redis (maxmemory, noeviction) fails the
uploads, and the reads of the same tier stay healthy (they used to be turned off with them)."""

from __future__ import annotations

import time

from kvtier.plans import AsyncLoad, LoadOp, SlotOp, StepPlan
from kvtier.tiers.remote import open_remote
from tests.servers import ServerProcess, fresh_redis, port_of  # noqa: F401  (fixture)
from tests.unit.test_worker_async import LAYOUT, NS, chunk_payload, wait_finished, worker


def test_failed_uploads_leave_reads_on(fresh_redis: ServerProcess) -> None:
    url = f"redis://127.0.0.1:{port_of(fresh_redis)}/0"
    reads, uploads = open_remote(url, ttl_s=None, timeout_s=2.0), open_remote(url, ttl_s=None, timeout_s=2.0)
    key = b"\x05" * 16
    assert reads.put(key, 0, chunk_payload(5), LAYOUT.fingerprint(), namespace=NS)
    client = reads.client  # type: ignore[attr-defined]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]))  # full from now on
    side, _ = worker(reads, uploads)
    assert side.uploader is not None
    for i in range(3):  # Redis answers OOM: the uploads fail
        side.uploader.submit(bytes([i]) * 16, 0, chunk_payload(i), namespace=NS)
    assert side.uploader.flush(10)
    _, failed = side.uploader.take_results()
    assert len(failed) == 3 and not uploads.healthy
    started = time.monotonic()
    side.start_load(StepPlan(async_loads=[AsyncLoad("r1", (), (SlotOp(key, 0, NS),), (LoadOp(0, 0, (1, 2)),), 5.0)]))
    assert wait_finished(side) == {"r1"}
    assert side.take_load_errors() == set()  # the chunk loaded
    assert reads.healthy and time.monotonic() - started < 5
    side.shutdown()
