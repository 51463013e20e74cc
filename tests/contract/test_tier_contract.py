"""One contract suite for every tier (``kvtier.tiers.contract``): memory, disk, and the remote tiers
on real servers (Redis, Redis Cluster, Valkey, Redis over TLS, S3 on SeaweedFS over http and https;
tests/remote_backends.py). Each tier supplies only a way to open it and, where its entries are
framed (disk, remote), a way to damage one; the tests are the same for all.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.datapath import HostPool
from kvtier.metrics import Metrics
from kvtier.store import TieredStore
from kvtier.tiers.contract import ReadResult, Tier
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.memory import MemoryTier
from tests.remote_backends import BACKENDS, Backend, make_backend
from tests.servers import redis_cluster_nodes, redis_server, redis_tls_server, seaweed, seaweed_tls, \
    valkey_server  # noqa: F401  (fixtures make_backend asks for)

LAYOUT = bytes(range(16))
PAYLOAD_BYTES = 16 << 10
NUM_SLOTS = 256
TIMEOUT_S = 2.0
TIERS = ["memory", "disk", *BACKENDS]
FRAMED = ["disk", *BACKENDS]  # entries carry a header and checksum: a damaged one can be detected


@dataclass
class Subject:
    """A tier under test and, for framed tiers, how to damage the stored bytes of an entry."""

    tier: Tier
    damage: Callable[[bytes, int, str], None] | None  # (key, rank, namespace): flip a payload byte


def flip_middle_byte(value: bytes) -> bytes:
    middle = len(value) // 2
    return value[:middle] + bytes([value[middle] ^ 0xFF]) + value[middle + 1:]


def memory_subject() -> Subject:
    books = TieredStore(NUM_SLOTS, "lru", None, 1, Metrics(), PAYLOAD_BYTES, {}, time.time)
    return Subject(MemoryTier(books, HostPool(NUM_SLOTS, PAYLOAD_BYTES, pin_memory=False), LAYOUT), None)


def disk_subject(root: Path) -> Subject:
    files = DiskFiles(str(root), LAYOUT)

    def damage(key: bytes, rank: int, namespace: str) -> None:
        path = files.path_for(key, rank, namespace)
        with open(path, "rb") as file:
            value = file.read()
        with open(path, "wb") as file:
            file.write(flip_middle_byte(value))

    return Subject(files, damage)


def remote_subject(backend: Backend) -> Subject:
    tier = backend.open(None, TIMEOUT_S)

    def damage(key: bytes, rank: int, namespace: str) -> None:
        name = tier.name_for(key, rank, namespace)
        value = backend.raw_get(name)
        assert value is not None
        backend.raw_set(name, flip_middle_byte(value))

    return Subject(tier, damage)


def open_subject(request: pytest.FixtureRequest, name: str, root: Path) -> Subject:
    if name == "memory":
        return memory_subject()
    if name == "disk":
        return disk_subject(root)
    return remote_subject(make_backend(request, name))


@pytest.fixture(params=TIERS)
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    opened = open_subject(request, request.param, tmp_path / "disk")
    yield opened
    close = getattr(opened.tier, "close", None)
    if close is not None:
        close()


@pytest.fixture(params=FRAMED)
def framed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    opened = open_subject(request, request.param, tmp_path / "disk")
    yield opened
    close = getattr(opened.tier, "close", None)
    if close is not None:
        close()


@pytest.fixture
def tier(subject: Subject) -> Tier:
    return subject.tier


def fresh_namespace() -> str:
    """A namespace of this test alone: the remote servers are shared by the whole session."""
    return f"t-{uuid.uuid4().hex[:12]}"


def new_keys(count: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(count)]


def payloads(count: int) -> list[bytes]:
    return [os.urandom(PAYLOAD_BYTES) for _ in range(count)]


def read(tier: Tier, keys: list[bytes], namespace: str, rank: int = 0) -> tuple[list[ReadResult], list[bytes]]:
    outs = [bytearray(PAYLOAD_BYTES) for _ in keys]
    results = tier.get_many_into([(key, memoryview(out)) for key, out in zip(keys, outs)], rank, LAYOUT,
                                 namespace=namespace)
    return results, [bytes(out) for out in outs]


def put(tier: Tier, keys: list[bytes], values: list[bytes], namespace: str, rank: int = 0) -> list[bool]:
    return tier.put_many(list(zip(keys, values)), rank, LAYOUT, namespace=namespace)


# ------------------------------------------------------------------------------------------- tests

def test_prefix_counts_none_part_and_all(tier: Tier) -> None:
    namespace, keys = fresh_namespace(), new_keys(6)
    assert tier.exists_prefix(keys, 0, namespace=namespace) == 0  # none
    assert put(tier, [keys[i] for i in (0, 1, 2, 4)], payloads(4), namespace) == [True] * 4
    assert tier.exists_prefix(keys, 0, namespace=namespace) == 3  # the gap at 3 ends the prefix
    assert tier.exists_prefix(keys[3:], 0, namespace=namespace) == 0
    assert tier.exists_prefix(keys[4:5], 0, namespace=namespace) == 1
    assert tier.exists_prefix([], 0, namespace=namespace) == 0
    assert tier.exists_prefix(keys[:3], 1, namespace=namespace) == 0  # another rank's shards
    assert put(tier, [keys[3], keys[5]], payloads(2), namespace) == [True, True]
    assert tier.exists_prefix(keys, 0, namespace=namespace) == 6  # all


def test_reads_give_back_the_bytes_written(tier: Tier) -> None:
    namespace, keys, values = fresh_namespace(), new_keys(5), payloads(5)
    assert put(tier, keys, values, namespace) == [True] * 5
    missing = new_keys(1)
    results, data = read(tier, [*keys, *missing], namespace)
    assert results == [ReadResult.OK] * 5 + [ReadResult.MISSING]
    assert data[:5] == values
    assert read(tier, keys[:1], namespace, rank=1)[0] == [ReadResult.MISSING]
    assert tier.get_many_into([], 0, LAYOUT, namespace=namespace) == []
    assert tier.put_many([], 0, LAYOUT, namespace=namespace) == []


def test_an_entry_is_never_overwritten(tier: Tier) -> None:
    namespace, keys = fresh_namespace(), new_keys(1)
    first, second = payloads(2)
    assert put(tier, keys, [first], namespace) == [True]
    assert put(tier, keys, [second], namespace) == [True]  # it is there afterwards: the first one
    assert read(tier, keys, namespace) == ([ReadResult.OK], [first])


def test_a_damaged_entry_is_a_miss_and_goes(framed: Subject) -> None:
    tier, namespace, keys = framed.tier, fresh_namespace(), new_keys(3)
    values = payloads(3)
    assert put(tier, keys, values, namespace) == [True] * 3
    assert framed.damage is not None
    framed.damage(keys[1], 0, namespace)
    results, data = read(tier, keys, namespace)
    assert results == [ReadResult.OK, ReadResult.CORRUPT, ReadResult.OK]  # a miss, not an exception
    assert data[0] == values[0] and data[2] == values[2]
    assert tier.exists_prefix(keys, 0, namespace=namespace) == 1  # removed: the prefix ends before it
    assert read(tier, keys[1:2], namespace)[0] == [ReadResult.MISSING]


def test_delete_removes_those_keys_only(tier: Tier) -> None:
    namespace, keys = fresh_namespace(), new_keys(4)
    assert put(tier, keys, payloads(4), namespace) == [True] * 4
    tier.delete(keys[:2], 0, namespace=fresh_namespace())  # another namespace's delete takes nothing
    assert tier.exists_prefix(keys, 0, namespace=namespace) == 4
    assert tier.delete(keys[2:], 0, namespace=namespace) == 2
    assert tier.exists_prefix(keys, 0, namespace=namespace) == 2
    assert read(tier, keys, namespace)[0] == [ReadResult.OK] * 2 + [ReadResult.MISSING] * 2
    assert tier.delete([], 0, namespace=namespace) == 0


def test_deleting_a_namespace_leaves_every_other(tier: Tier) -> None:
    doomed, other = fresh_namespace(), fresh_namespace()
    lookalike = f"{doomed}-2"  # shares the doomed namespace's name as a prefix
    mine, theirs, similar = new_keys(6), new_keys(2), new_keys(1)
    assert put(tier, mine, payloads(6), doomed) == [True] * 6
    assert put(tier, theirs, payloads(2), other) == [True] * 2
    assert put(tier, similar, payloads(1), lookalike) == [True]
    assert tier.delete_namespace(doomed) == 6
    assert tier.exists_prefix(mine, 0, namespace=doomed) == 0
    assert tier.exists_prefix(theirs, 0, namespace=other) == 2
    assert tier.exists_prefix(similar, 0, namespace=lookalike) == 1
    assert tier.delete_namespace(doomed) == 0
    for namespace in (other, lookalike):
        tier.delete_namespace(namespace)


def test_namespaces_are_isolated(tier: Tier) -> None:
    mine, theirs, keys = fresh_namespace(), fresh_namespace(), new_keys(2)
    assert put(tier, keys, payloads(2), mine) == [True, True]
    assert tier.exists_prefix(keys, 0, namespace=theirs) == 0
    assert read(tier, keys, theirs)[0] == [ReadResult.MISSING] * 2
    assert tier.delete_namespace(theirs) == 0
    assert tier.exists_prefix(keys, 0, namespace=mine) == 2


def test_bad_input_is_a_clear_error(tier: Tier) -> None:
    with pytest.raises(ValueError, match="namespace"):
        tier.delete_namespace("..")
    with pytest.raises(ValueError, match="namespace"):
        tier.exists_prefix(new_keys(1), 0, namespace="a/b")
    if not isinstance(tier, MemoryTier):  # memory keys are dict keys: any bytes are a (missing) key
        with pytest.raises(ValueError, match="16 bytes"):
            tier.exists_prefix([b"short"], 0, namespace=fresh_namespace())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(held=st.lists(st.booleans(), min_size=1, max_size=8))
def test_the_prefix_ends_at_the_first_key_not_held(tier: Tier, held: list[bool]) -> None:
    namespace, keys = fresh_namespace(), new_keys(len(held))
    stored = [key for key, keep in zip(keys, held) if keep]
    assert put(tier, stored, payloads(len(stored)), namespace) == [True] * len(stored)
    expected = held.index(False) if False in held else len(held)
    assert tier.exists_prefix(keys, 0, namespace=namespace) == expected
    results, _ = read(tier, keys, namespace)
    assert results == [ReadResult.OK if keep else ReadResult.MISSING for keep in held]
    tier.delete_namespace(namespace)
