"""MLA under tensor parallelism (issue 14 #3): every rank holds the same latent KV, so a chunk has
one shard on disk and in the remote tier. Rank 0 writes, deletes and uploads it; rank 1 writes
nothing, acknowledges the write at once (the entry commits when rank 0's write lands), and reads
rank 0's shard. The start-up scan keeps an MLA entry with its one shard; a rank-split layout
still needs every rank's."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvtier.config import load_config
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.integrations.vllm.startup import scan_disk
from kvtier.integrations.vllm.worker import WorkerSide
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics
from kvtier.plans import AsyncLoad, EntryRef, LoadOp, SlotOp, StepPlan, StoreOp, WorkerReport
from kvtier.store import DiskSettings
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.remote import object_name
from tests.dict_tier import DictTier
from tests.unit.test_store import NS, key, make

MLA = KVLayout("mla", 2, 1, 64, 16, "bfloat16")
SPLIT = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")
CHUNK = 32  # two blocks of 16
NUM_BLOCKS = 8
LAYERS = ("l0", "l1")


def engine_setup(layout: KVLayout, world_size: int, disk: Path | None) -> EngineSetup:
    config = load_config({"chunk_tokens": CHUNK, **({"disk.path": str(disk)} if disk else {})}, {}).config
    return EngineSetup(config, layout, Namespace(NS, "m", layout.fingerprint(), 1), LAYERS, world_size,
                       layout.chunk_bytes(CHUNK), 4, str(disk) if disk else None, 8 if disk else 0)


def mla_worker(rank: int, disk: Path | None, remote: DictTier | None = None) -> tuple[WorkerSide,
                                                                                      dict[str, torch.Tensor]]:
    side = WorkerSide(engine_setup(MLA, 2, disk), rank, remote, None)
    caches = {name: torch.zeros(NUM_BLOCKS, 16, 64, dtype=torch.bfloat16) for name in LAYERS}
    side.register_kv_caches(caches, "CPU_MLA")
    return side, caches


def fill_latents(caches: dict[str, torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for cache in caches.values():
        cache.copy_(torch.randn(cache.shape, generator=gen).to(torch.bfloat16))


def report_after(side: WorkerSide, done: Callable[[WorkerReport], bool]) -> WorkerReport:
    merged = WorkerReport()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        report = side.take_report()
        if report is not None:
            merged.disk_written.extend(report.disk_written)
            merged.promoted.extend(report.promoted)
            merged.disk_written_bytes += report.disk_written_bytes
        if done(merged):
            return merged
        time.sleep(0.01)
    raise AssertionError(f"the worker never reported: {merged}")


def test_setup_stores_mla_once_and_split_layouts_once_per_rank() -> None:
    mla, split = engine_setup(MLA, 2, None), engine_setup(SPLIT, 2, None)
    assert mla.num_shards == 1 and [mla.shard_of(r) for r in (0, 1)] == [0, 0]
    assert [mla.writes_shard(r) for r in (0, 1)] == [True, False]
    assert split.num_shards == 2 and [split.shard_of(r) for r in (0, 1)] == [0, 1]
    assert [split.writes_shard(r) for r in (0, 1)] == [True, True]


def test_only_rank_0_writes_an_mla_chunk_and_both_ranks_load_it(tmp_path: Path) -> None:
    store_op, written = StoreOp(key(1), 0, (2, 5), "r1"), SlotOp(key(1), 0, NS)
    sides = [mla_worker(rank, tmp_path) for rank in (0, 1)]
    for side, caches in sides:  # both ranks hold the same latents (the engine computed them)
        fill_latents(caches, seed=3)
        side.save(StepPlan(stores=[store_op], write_through=[written]))
    reports = [report_after(side, lambda r: bool(r.disk_written)) for side, _ in sides]
    assert [r.disk_written for r in reports] == [[key(1)], [key(1)]]  # both acknowledge: the plan completes
    assert reports[0].disk_written_bytes == MLA.chunk_bytes(CHUNK) and reports[1].disk_written_bytes == 0
    files = DiskFiles(str(tmp_path), MLA.fingerprint())
    assert [(entry.key, entry.rank) for entry in files.scan()] == [(key(1), 0)]  # one copy, rank 0's
    expected = [sides[0][1][name][[2, 5]].clone() for name in LAYERS]
    for side, caches in sides:  # a restart: empty blocks, the chunk comes back from rank 0's file
        for cache in caches.values():
            cache.zero_()
        side.start_load(StepPlan(async_loads=[AsyncLoad("r2", (SlotOp(key(1), 1, NS),), (), (LoadOp(1, 0, (6, 7)),),
                                                        5.0)]))
        report_after(side, lambda r: r.promoted == [key(1)])
        deadline = time.monotonic() + 5
        while not side.finished_loads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert side.take_load_errors() == set()
        for name, pages in zip(LAYERS, expected):
            assert torch.equal(caches[name][[6, 7]], pages)
    for side, _ in sides:
        side.shutdown()


def test_only_rank_0_uploads_and_deletes_an_mla_chunk(tmp_path: Path) -> None:
    remote = DictTier()
    sides = [mla_worker(rank, tmp_path, remote) for rank in (0, 1)]
    assert sides[0][0].uploader is not None and sides[1][0].uploader is None
    for side, caches in sides:
        fill_latents(caches, seed=4)
        side.save(StepPlan(stores=[StoreOp(key(2), 0, (1, 3), "r1")], write_through=[SlotOp(key(2), 0, NS)],
                           remote_puts=[SlotOp(key(2), 0, NS)]))
    for side, _ in sides:
        report_after(side, lambda r: bool(r.disk_written))
    assert sides[0][0].uploader.flush(5)
    assert list(remote.values) == [object_name(key(2), 0, NS)]  # one object, rank 0's shard
    files = DiskFiles(str(tmp_path), MLA.fingerprint())
    sides[1][0].save(StepPlan(deletes=[EntryRef(key(2), NS)]))  # rank 1 deletes nothing
    assert sides[1][0].writer is not None and sides[1][0].writer.flush(5)
    assert len(files.scan()) == 1
    sides[0][0].save(StepPlan(deletes=[EntryRef(key(2), NS)]))
    assert sides[0][0].writer is not None and sides[0][0].writer.flush(5)
    assert files.scan() == []
    for side, _ in sides:
        side.shutdown()


def test_an_mla_entry_commits_when_rank_0_has_written_it() -> None:
    store = make(num_slots=4, disk=DiskSettings(capacity_entries=8, write_through=True), world_size=2)
    store.prepare_store(key(0), NS)
    store.complete(WorkerReport(stored=[key(0), key(0)]))
    store.take_ops()
    store.complete(WorkerReport(disk_written=[key(0)]))  # rank 1's acknowledgement, at once
    assert store._disk.is_pending(key(0))  # lookups do not find it yet
    store.complete(WorkerReport(disk_written=[key(0)]))  # rank 0's write landed
    assert store.on_disk(key(0)) and not store._disk.is_pending(key(0))


def test_the_startup_scan_keeps_an_mla_entry_with_its_one_shard(tmp_path: Path) -> None:
    payload = bytes(MLA.chunk_bytes(CHUNK))
    files = DiskFiles(str(tmp_path), MLA.fingerprint())
    files.write(key(1), 0, payload, namespace=NS)
    files.write(key(2), 0, payload, namespace=NS)
    files.write(key(2), 1, payload, namespace=NS)  # written once per rank (before MLA was stored once)
    found = scan_disk(engine_setup(MLA, 2, tmp_path), Metrics(), None)
    assert sorted(item.key for item in found) == [key(1), key(2)]  # the old scan wanted rank 1's file of key 1
    assert sorted((entry.key, entry.rank) for entry in files.scan()) == [(key(1), 0), (key(2), 0)]  # never read
    split_dir = tmp_path / "split"
    split_files = DiskFiles(str(split_dir), SPLIT.fingerprint())
    split_files.write(key(1), 0, bytes(SPLIT.chunk_bytes(CHUNK)), namespace=NS)
    assert scan_disk(engine_setup(SPLIT, 2, split_dir), Metrics(), None) == []  # rank 1's shard is missing
