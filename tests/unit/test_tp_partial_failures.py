"""Issue 16 #9, tensor parallelism: a write or promote that fails on one rank fails for every rank.
The store forgets what the other ranks acknowledged of it (a later write of the same key needs
every rank again), ignores their late acknowledgements, plans the delete of every rank's file of
a failed write, and the start-up scan removes entries some rank lacks. Before, the surviving
ranks' files stayed for ever (past disk.capacity) and a stale acknowledgement let one rank's
later write commit an entry the other rank never wrote."""

from __future__ import annotations

from pathlib import Path

from kvtier.config import load_config
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.integrations.vllm.startup import scan_disk
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics
from kvtier.plans import EntryRef, WorkerReport
from kvtier.store import DiskItem, DiskSettings
from kvtier.tiers.disk import DiskFiles
from tests.unit.test_store import NS, key, make

CHUNK = 256


def tp2_write_through():  # type: ignore[no-untyped-def]
    store = make(num_slots=4, disk=DiskSettings(capacity_entries=8, write_through=True), world_size=2)
    store.prepare_store(key(0), NS)
    store.complete(WorkerReport(stored=[key(0), key(0)]))  # both ranks copied the chunk into memory
    store.take_ops()
    return store


def test_a_write_failed_on_one_rank_deletes_every_ranks_file() -> None:
    store = tp2_write_through()
    store.complete(WorkerReport(disk_written=[key(0)], disk_failed=[key(0)]))  # rank 0 wrote, rank 1 failed
    assert not store.on_disk(key(0))
    assert store.take_ops().deletes == [EntryRef(key(0), NS)]  # rank 0's file goes too


def test_a_failed_write_leaves_no_acknowledgement_behind() -> None:
    store = tp2_write_through()
    store.complete(WorkerReport(disk_written=[key(0)]))  # rank 0 wrote
    store.complete(WorkerReport(disk_failed=[key(0)]))  # rank 1 failed, a step later
    assert not store.on_disk(key(0)) and store.take_ops().deletes == [EntryRef(key(0), NS)]
    assert not store._acks  # rank 0's acknowledgement would have committed the next write on one rank's word


def test_a_late_acknowledgement_of_a_failed_write_is_ignored() -> None:
    store = tp2_write_through()
    store.complete(WorkerReport(disk_failed=[key(0)]))  # rank 1 failed first
    store.complete(WorkerReport(disk_written=[key(0)]))  # rank 0's write ends later
    assert not store.on_disk(key(0))
    assert not store._acks  # nothing left to count toward a later write


def test_a_promote_failed_on_one_rank_drops_the_entry_and_its_acknowledgements() -> None:
    store = make(num_slots=2, world_size=2,
                 disk=DiskSettings(capacity_entries=4, write_through=True, initial=[DiskItem(key(7), NS, 0.0)]))
    store.prepare_promote("req", NS, [key(7)])
    store.complete(WorkerReport(promoted=[key(7)]))  # rank 0 read it
    store.complete(WorkerReport(promote_failed=[key(7)]))  # rank 1 did not
    assert not store.in_memory(key(7)) and not store._acks
    store.leases.release("req")
    store.complete(WorkerReport(promoted=[key(7)]))  # a late acknowledgement changes nothing
    assert not store.in_memory(key(7)) and not store._acks


def test_the_startup_scan_removes_entries_some_rank_lacks(tmp_path: Path) -> None:
    layout = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")
    config = load_config({"chunk_tokens": CHUNK, "disk.path": str(tmp_path)}, {}).config
    setup = EngineSetup(config, layout, Namespace("default", "m", layout.fingerprint(), 2), ("l0", "l1"), 2,
                        layout.chunk_bytes(CHUNK), 4, str(tmp_path), 8)
    files = DiskFiles(str(tmp_path), layout.fingerprint())
    payload = bytes(layout.chunk_bytes(CHUNK))
    for rank in (0, 1):
        files.write(key(1), rank, payload, namespace=NS)  # complete
    files.write(key(2), 0, payload, namespace=NS)  # rank 1 never wrote it
    files.write(key(3), 1, payload, namespace=NS)  # rank 0 never wrote it
    found = scan_disk(setup, Metrics(), None)
    assert [item.key for item in found] == [key(1)]
    assert sorted((entry.key, entry.rank) for entry in files.scan()) == [(key(1), 0), (key(1), 1)]
