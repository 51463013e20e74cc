"""The upload queue: invalidation beats queued uploads (they used to land after the delete: 62 of
64 invalidated chunks came back)."""

from __future__ import annotations

import threading

from kvtier.tiers.uploader import RemoteUploader
from tests.dict_tier import DictTier

LAYOUT = bytes(16)


class SlowTier(DictTier):
    """A remote whose uploads wait for ``gate`` (a slow link)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()  # an upload is in flight

    def put(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.gate.wait(10)
        return super().put(*args, **kwargs)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_invalidating_a_namespace_drops_its_queued_uploads_and_deletes_behind_them() -> None:
    tier = SlowTier()
    uploader = RemoteUploader(tier, LAYOUT, queue_depth=100)
    for i in range(8):
        assert uploader.submit(key(i), 0, b"x" * 64, namespace="tenant-a" if i % 2 == 0 else "tenant-b")
    assert tier.entered.wait(10)  # key 0 is being uploaded (waiting on the gate); 1..7 are queued
    assert uploader.remove("tenant-a", None, 0) == 3  # keys 2, 4, 6 dropped
    assert uploader.submit(key(10), 0, b"y" * 64, namespace="tenant-a")  # after the invalidation: kept
    tier.gate.set()
    assert uploader.flush(10)
    names = set(tier.values)
    assert tier.name_for(key(0), 0, "tenant-a") not in names  # in flight at invalidation: deleted after
    assert {tier.name_for(key(i), 0, "tenant-a") for i in (2, 4, 6)}.isdisjoint(names)
    assert tier.name_for(key(10), 0, "tenant-a") in names
    assert {tier.name_for(key(i), 0, "tenant-b") for i in (1, 3, 5, 7)} <= names
    done, failed = uploader.take_results()
    assert sorted(failed) == [key(2), key(4), key(6)]
    uploader.close()


def test_invalidating_keys_drops_only_those() -> None:
    tier = SlowTier()
    uploader = RemoteUploader(tier, LAYOUT, queue_depth=100)
    for i in range(4):
        uploader.submit(key(i), 0, b"x" * 64, namespace="tenant-a")
    assert tier.entered.wait(10)
    assert uploader.remove("tenant-a", [key(2)], 0) == 1
    tier.gate.set()
    assert uploader.flush(10)
    assert {name for name in tier.values} == {tier.name_for(key(i), 0, "tenant-a") for i in (0, 1, 3)}
    uploader.close()
