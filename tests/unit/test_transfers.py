"""The transfer executor and the remote lookups: disk and remote I/O off the engine's thread,
bounded by wall-clock deadlines, and never a late read into a slot that was given back."""

from __future__ import annotations

import time

import pytest

from kvtier.plans import SlotOp
from kvtier.remote_lookup import RemoteLookups
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.disk import DiskFiles
from kvtier.transfers import FillExecutor
from tests.dict_tier import DictTier

FINGERPRINT = b"f" * 16
SLOT_BYTES = 4096
NS = "default"


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> bytes:
    return bytes([i % 251]) * SLOT_BYTES


class Slots:
    def __init__(self, num: int) -> None:
        self.data = [bytearray(SLOT_BYTES) for _ in range(num)]

    def view(self, slot: int) -> memoryview:
        return memoryview(self.data[slot])


def settle(executor: FillExecutor, timeout_s: float = 5.0) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        settled = executor.take_settled()
        if settled:
            return settled
        time.sleep(0.002)
    raise AssertionError("nothing settled")


def test_disk_reads_fill_the_slots_and_a_corrupt_entry_is_not_ok(tmp_path) -> None:
    disk = DiskFiles(str(tmp_path), FINGERPRINT)
    for i in range(3):
        disk.write(key(i), 0, payload(i), namespace=NS)
    path = disk.path_for(key(1), 0, NS)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    slots = Slots(3)
    executor = FillExecutor(slots.view, 0, FINGERPRINT, disk, None)
    executor.submit("r1", [SlotOp(key(i), i, NS) for i in range(3)], [], deadline_s=5)
    [settled] = settle(executor)
    assert settled.job_id == "r1" and not settled.timed_out
    assert settled.ok_slots == {0, 2}
    assert bytes(slots.data[0]) == payload(0) and bytes(slots.data[2]) == payload(2)
    results = {r.op.key: r.result for r in executor.take_results()[0]}
    assert results == {key(0): ReadResult.OK, key(1): ReadResult.CORRUPT, key(2): ReadResult.OK}
    assert executor.take_results()[0] == []  # each result once
    executor.close()


def test_a_stalled_remote_settles_at_the_deadline_and_reports_its_read_later() -> None:
    remote = DictTier()
    remote.put(key(5), 0, payload(5), FINGERPRINT, namespace=NS)
    remote.delay_s = 0.5
    slots = Slots(1)
    executor = FillExecutor(slots.view, 0, FINGERPRINT, None, remote)
    started = time.monotonic()
    executor.submit("r1", [], [SlotOp(key(5), 0, NS)], deadline_s=0.05)
    [settled] = settle(executor)
    assert time.monotonic() - started < 0.4  # did not wait for the server
    assert settled.timed_out and settled.ok_slots == frozenset()
    assert executor.take_results() == ([], 0.0)  # the read is still running: its slot stays taken
    assert executor.wait_idle(5)
    [late], remote_seconds = executor.take_results()
    assert late.result is ReadResult.OK and late.op.slot == 0
    assert remote_seconds >= 0.5
    executor.close()


def test_a_stalled_remote_does_not_hold_back_a_disk_read(tmp_path) -> None:
    disk = DiskFiles(str(tmp_path), FINGERPRINT)
    disk.write(key(1), 0, payload(1), namespace=NS)
    remote = DictTier()
    remote.delay_s = 1.0
    slots = Slots(2)
    executor = FillExecutor(slots.view, 0, FINGERPRINT, disk, remote)
    executor.submit("slow", [], [SlotOp(key(9), 0, NS)], deadline_s=5)
    executor.submit("fast", [SlotOp(key(1), 1, NS)], [], deadline_s=5)
    [settled] = settle(executor, timeout_s=0.5)
    assert settled.job_id == "fast" and settled.ok_slots == {1}
    executor.close()


def test_a_lookup_answers_at_once_from_a_healthy_remote() -> None:
    remote = DictTier()
    for i in range(2):
        remote.put(key(i), 0, payload(i), FINGERPRINT, namespace=NS)
    lookups = RemoteLookups(remote, 0, timeout_s=1.0, inline_wait_s=1.0)
    assert lookups.ask("r1", [key(0), key(1), key(2)], NS, 0) == [0.0, 0.0]  # two held, ages unknown
    lookups.close()


@pytest.mark.parametrize("timeout_s", [0.2])
def test_a_black_holed_lookup_never_blocks_and_counts_as_a_miss_after_the_deadline(timeout_s: float) -> None:
    remote = DictTier()
    remote.delay_s = 2.0
    lookups = RemoteLookups(remote, 0, timeout_s=timeout_s, inline_wait_s=0.002)
    answers = []
    started = time.monotonic()
    while True:
        asked = time.monotonic()
        answer = lookups.ask("r1", [key(0)], NS, 0)
        assert time.monotonic() - asked < 0.1  # the caller's thread never waits for the server
        answers.append(answer)
        if answer is not None:
            break
        time.sleep(0.01)
    assert answers[-1] == [] and all(answer is None for answer in answers[:-1])
    assert timeout_s <= time.monotonic() - started < timeout_s + 0.5
    assert lookups.num_timeouts == 1
    lookups.close()
