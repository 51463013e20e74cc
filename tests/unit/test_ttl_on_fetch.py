"""Issue 16 #8: a fetch does not refresh a TTL. An entry promoted from the remote tier into memory
keeps its age on the remote (``RemoteTier.held_ages``), as one promoted from disk keeps its file's
time; before, a remote entry fetched just before it expired lived another full TTL in memory (and
on disk behind it), and could be passed from engine to engine for ever.

The real servers' ages (Redis: the PTTL left of the TTL it was written with; S3: Date less
Last-Modified) are checked in tests/integration/test_remote_ages.py."""

from __future__ import annotations

import time
from collections.abc import Sequence

from kvtier.config import NamespaceLimits, load_config
from kvtier.manager import KVManager, LoadRequest
from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport
from kvtier.store import TieredStore
from tests.dict_tier import DictTier
from tests.unit.test_store import CHUNK_BYTES, NS, Clock, key

TTL_S = 10
LIMITS = {NS: NamespaceLimits(ttl_s=TTL_S)}
FINGERPRINT = b"\x01" * 16


def test_a_chunk_promoted_from_the_remote_keeps_its_age() -> None:
    clock = Clock()
    store = TieredStore(4, "lru", None, 1, Metrics(), CHUNK_BYTES, LIMITS, clock)
    ops = store.prepare_promote("r1", NS, [key(1), key(2)], from_remote=True, ages_s=[8.0, 1.0])
    store.complete(WorkerReport(promoted=[op.key for op in ops]))
    store.leases.release("r1")
    assert store.lookup([key(1)]).num_chunks == 1
    clock.now += 2.5  # key(1) was written 10.5 s ago on the remote: expired, whatever the fetch
    assert store.lookup([key(1)]).num_chunks == 0
    assert store.lookup([key(2)]).num_chunks == 1  # 3.5 s old
    clock.now += 7
    assert store.lookup([key(2)]).num_chunks == 0


class AgedDictTier(DictTier):
    """A DictTier that knows when each value was written (as Redis and S3 do)."""

    def __init__(self) -> None:
        super().__init__()
        self.ages_s: dict[str, float] = {}

    def _prefix_ages(self, names: Sequence[str], max_age_s: int) -> list[float]:
        return [self.ages_s.get(name, 0.0) for name in names[:self._count_prefix(names, max_age_s)]]


def test_the_manager_hands_the_remote_ages_to_the_store() -> None:
    clock = Clock()
    config = load_config({"chunk_tokens": 16, "remote.cost_gate": False}, {}).config
    store = TieredStore(4, "lru", None, 1, Metrics(), CHUNK_BYTES, LIMITS, clock)
    remote = AgedDictTier()
    manager = KVManager(config, store, Metrics(), remote, 16, CHUNK_BYTES, 1)
    for i in (1, 2):
        assert remote.put(key(i), 0, bytes(CHUNK_BYTES), FINGERPRINT, namespace=NS)
    remote.ages_s = {remote.name_for(key(1), 0, NS): 9.0, remote.name_for(key(2), 0, NS): 9.0}
    deadline = time.monotonic() + 5
    planned = None
    while planned is None and time.monotonic() < deadline:  # the remote answers on a background thread
        planned = manager.plan_load(LoadRequest("r1", NS, [key(1), key(2), key(3)], 0, 0))
        time.sleep(0.005)
    assert planned is not None and len(planned.remote) == 2
    store.complete(WorkerReport(promoted=[key(1), key(2)]))
    manager.load_finished("r1")
    assert store.lookup([key(1), key(2)]).num_chunks == 2
    clock.now += 1.5  # 10.5 s since they were written: expired in memory as on the remote
    assert store.lookup([key(1), key(2)]).num_chunks == 0
    manager.close()
