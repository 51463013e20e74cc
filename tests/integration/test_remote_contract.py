"""What every remote tier does beyond the tier contract, on real servers (tests/servers.py).

Backends (tests/remote_backends.py): Redis, Redis Cluster (3 masters), Valkey, Redis over TLS with
an ACL user, and S3 (SeaweedFS) over http and https; both TLS servers use a CA made in the test and
require client certificates. Each supplies only a way to open the tier and a raw client for
server-side checks and tampering; the tests are the same for all. The contract every tier shares
(prefix counts, round trips, deletes, namespaces) is tests/contract/test_tier_contract.py, which
runs on these backends too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from kvtier.compression import KVCodec
from kvtier.crypto import SEAL_OVERHEAD_BYTES, Sealer
from kvtier.entry import CODEC_AES256_GCM, CODEC_CACHEGEN, HEADER_BYTES, EntryHeader, decode_header, encode_header, payload_checksum
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout
from kvtier.tiers import remote_reads
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.remote import RemoteTier, object_name, open_remote
from tests.remote_backends import BACKENDS, NATIVE_TTL_BACKENDS, Backend, make_backend, s3_backend, tls_options
from tests.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, TLS_PASSWORD, TLS_USER, ServerProcess, fresh_redis, \
    fresh_seaweed, free_ports, port_of, redis_cluster_nodes, redis_server, redis_tls_server, s3_client, seaweed, \
    seaweed_tls, valkey_server  # noqa: F401  (fixtures)

TENANT = "tenant-a"
LAYOUT = bytes(range(16))
OTHER_LAYOUT = bytes(range(1, 17))
PAYLOAD_BYTES = 256 << 10
TIMEOUT_S = 2.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.fixture(params=NATIVE_TTL_BACKENDS)
def ttl_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.fixture
def tier(backend: Backend) -> Iterator[RemoteTier]:
    opened = backend.open(None, TIMEOUT_S)
    yield opened
    opened.close()


def new_key() -> bytes:
    return os.urandom(16)


def payload_of(num_bytes: int = PAYLOAD_BYTES) -> bytes:
    return os.urandom(num_bytes)


def read(tier: RemoteTier, key: bytes, num_bytes: int = PAYLOAD_BYTES, rank: int = 0,
         layout: bytes = LAYOUT, namespace: str = "tenant-a") -> tuple[ReadResult, bytes]:
    out = bytearray(num_bytes)
    return tier.get_into(key, rank, memoryview(out), layout, namespace=namespace), bytes(out)


# --------------------------------------------------------------------------------------- contract

def test_a_chunk_sized_value_round_trips(tier: RemoteTier) -> None:
    key, payload = new_key(), payload_of(5_900_000)  # one SmolLM2-sized chunk
    assert tier.put(key, 0, memoryview(payload), LAYOUT, namespace=TENANT)
    assert read(tier, key, len(payload)) == (ReadResult.OK, payload)
    assert tier.healthy and tier.num_errors == 0 and tier.num_corrupt == 0


def test_put_of_an_existing_entry_does_not_rewrite_it(backend: Backend) -> None:
    tier = backend.open(100, TIMEOUT_S)
    key, first, second = new_key(), payload_of(), payload_of()
    assert tier.put(key, 0, first, LAYOUT, namespace=TENANT)
    name = tier.name_for(key, 0, TENANT)
    stored, marker = backend.raw_get(name), backend.write_marker(name)
    time.sleep(1.1)  # S3 Last-Modified has one-second resolution
    assert tier.put(key, 0, second, LAYOUT, namespace=TENANT)  # True: the entry is there
    assert backend.write_marker(name) == marker  # not rewritten: same expiry time / ETag and mtime
    assert backend.raw_get(name) == stored
    assert read(tier, key) == (ReadResult.OK, first)
    tier.close()


def test_ttl_is_set_on_the_server(ttl_backend: Backend) -> None:
    tier = ttl_backend.open(100, TIMEOUT_S)
    key = new_key()
    assert tier.put(key, 0, payload_of(), LAYOUT, namespace=TENANT)
    remaining = ttl_backend.remaining_ttl_s(tier.name_for(key, 0, TENANT))
    assert remaining is not None and 99 < remaining <= 100
    no_ttl = ttl_backend.open(None, TIMEOUT_S)
    other = new_key()
    assert no_ttl.put(other, 0, payload_of(), LAYOUT, namespace=TENANT)
    assert ttl_backend.remaining_ttl_s(no_ttl.name_for(other, 0, TENANT)) == -0.001  # PTTL -1: no expiry
    tier.close()
    no_ttl.close()


def test_a_namespace_ttl_shorter_than_the_tiers_is_set_on_the_server(ttl_backend: Backend) -> None:
    tier = ttl_backend.open(100, TIMEOUT_S)
    short, capped = new_key(), new_key()
    assert tier.put(short, 0, payload_of(), LAYOUT, namespace=TENANT, ttl_s=10)
    assert tier.put(capped, 0, payload_of(), LAYOUT, namespace=TENANT, ttl_s=1000)  # the tier's 100 s wins
    short_left = ttl_backend.remaining_ttl_s(tier.name_for(short, 0, TENANT))
    capped_left = ttl_backend.remaining_ttl_s(tier.name_for(capped, 0, TENANT))
    assert short_left is not None and 9 < short_left <= 10
    assert capped_left is not None and 99 < capped_left <= 100
    tier.close()


def test_s3_hides_entries_older_than_the_namespace_ttl_at_lookup(request: pytest.FixtureRequest) -> None:
    """S3 cannot expire single objects: a lookup with the namespace's TTL as ``max_age_s`` treats
    older ones as absent (Redis expires them itself, see the test above)."""
    tier = make_backend(request, "s3").open(None, TIMEOUT_S)
    key = new_key()
    assert tier.put(key, 0, payload_of(1024), LAYOUT, namespace=TENANT)
    assert tier.exists_prefix([key], 0, namespace=TENANT, max_age_s=100) == 1
    time.sleep(2.1)  # Last-Modified has one-second resolution
    assert tier.exists_prefix([key], 0, namespace=TENANT) == 1  # no TTL anywhere: still there
    assert tier.exists_prefix([key], 0, namespace=TENANT, max_age_s=1) == 0
    tier.close()


def test_expired_entry_misses(backend: Backend) -> None:
    tier = backend.open(1, TIMEOUT_S)
    key, payload = new_key(), payload_of()
    assert tier.put(key, 0, payload, LAYOUT, namespace=TENANT)
    assert read(tier, key) == (ReadResult.OK, payload)
    deadline = time.monotonic() + 6
    while read(tier, key)[0] is ReadResult.OK:  # S3: server clock, one-second resolution
        assert time.monotonic() < deadline, "the entry did not expire"
        time.sleep(0.25)
    assert read(tier, key)[0] is ReadResult.MISSING
    assert tier.exists_prefix([key], 0, namespace=TENANT) == 0
    assert tier.put(key, 0, payload, LAYOUT, namespace=TENANT)  # an expired entry is written again
    assert read(tier, key) == (ReadResult.OK, payload)
    tier.close()


def flip_byte(value: bytes, offset: int) -> bytes:
    return value[:offset] + bytes([value[offset] ^ 0xFF]) + value[offset + 1:]


TAMPERING: dict[str, Callable[[bytes, bytes], bytes]] = {  # (stored value, another entry's value) -> new value
    "payload byte flipped": lambda value, other: flip_byte(value, HEADER_BYTES + PAYLOAD_BYTES // 2),
    "header byte flipped": lambda value, other: flip_byte(value, 30),
    "truncated": lambda value, other: value[:-10],
    "header only": lambda value, other: value[:HEADER_BYTES],
    "too long": lambda value, other: value + b"\0",
    "empty": lambda value, other: b"",
    "not an entry": lambda value, other: os.urandom(len(value)),
    "another key's entry": lambda value, other: other,
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_bad_values_read_corrupt_and_are_deleted(backend: Backend, tier: RemoteTier, tampering: str) -> None:
    key, neighbour, other = new_key(), new_key(), new_key()
    for each in (key, neighbour, other):
        assert tier.put(each, 0, payload_of(), LAYOUT, namespace=TENANT)
    name = tier.name_for(key, 0, TENANT)
    stored, other_value = backend.raw_get(name), backend.raw_get(tier.name_for(other, 0, TENANT))
    assert stored is not None and other_value is not None
    backend.raw_set(name, TAMPERING[tampering](stored, other_value))
    outs = [bytearray(PAYLOAD_BYTES), bytearray(PAYLOAD_BYTES)]
    results = tier.get_many_into([(key, memoryview(outs[0])), (neighbour, memoryview(outs[1]))], 0, LAYOUT, namespace=TENANT)
    assert results == [ReadResult.CORRUPT, ReadResult.OK]
    assert tier.num_corrupt == 1 and tier.healthy
    assert backend.raw_get(name) is None  # deleted
    assert read(tier, key)[0] is ReadResult.MISSING


def test_entry_of_another_layout_reads_corrupt(backend: Backend, tier: RemoteTier) -> None:
    key = new_key()
    assert tier.put(key, 0, payload_of(), OTHER_LAYOUT, namespace=TENANT)
    assert read(tier, key, layout=LAYOUT)[0] is ReadResult.CORRUPT
    assert backend.raw_get(tier.name_for(key, 0, TENANT)) is None


def test_wrong_size_request_reads_corrupt(tier: RemoteTier) -> None:
    key = new_key()
    assert tier.put(key, 0, payload_of(), LAYOUT, namespace=TENANT)
    assert read(tier, key, num_bytes=PAYLOAD_BYTES - 1)[0] is ReadResult.CORRUPT


# --------------------------------------------------------------------------------------- encryption at rest

SEALER = Sealer(os.urandom(32))


@pytest.fixture
def sealed_tier(backend: Backend) -> Iterator[RemoteTier]:
    opened = backend.open(None, TIMEOUT_S, sealer=SEALER)
    yield opened
    opened.close()


def forged(value: bytes, key: bytes | None = None, stored: bytes | None = None) -> bytes:
    """``value`` with its header's key and/or payload replaced and every checksum recomputed, as
    anyone with write access to the store can do (xxh3 is no secret)."""
    old = decode_header(value)
    stored = value[HEADER_BYTES:] if stored is None else stored
    header = EntryHeader(key or old.key, old.rank, old.layout_fingerprint, old.codec, len(stored),
                         payload_checksum(stored))
    return encode_header(header) + stored


def test_encrypted_round_trip(backend: Backend, sealed_tier: RemoteTier) -> None:
    keys = [new_key() for _ in range(3)]
    payloads = [payload_of() for _ in keys]
    big_key, big_payload = new_key(), payload_of(5_900_000)
    assert all(sealed_tier.put(key, 0, payload, LAYOUT, namespace=TENANT) for key, payload in zip(keys, payloads))
    assert sealed_tier.put(big_key, 0, memoryview(big_payload), LAYOUT, namespace=TENANT)
    outs = [bytearray(PAYLOAD_BYTES) for _ in range(4)]
    items = [(key, memoryview(out)) for key, out in zip([*keys, new_key()], outs)]
    assert sealed_tier.get_many_into(items, 0, LAYOUT, namespace=TENANT) == [ReadResult.OK] * 3 + [ReadResult.MISSING]
    assert [bytes(out) for out in outs[:3]] == payloads
    assert read(sealed_tier, big_key, len(big_payload), namespace=TENANT) == (ReadResult.OK, big_payload)
    # Step: what the server holds is sealed: the sealed length, codec 1, no run of the plaintext.
    stored = backend.raw_get(sealed_tier.name_for(keys[0], 0, TENANT))
    assert stored is not None and len(stored) == HEADER_BYTES + PAYLOAD_BYTES + SEAL_OVERHEAD_BYTES
    assert decode_header(stored).codec == CODEC_AES256_GCM
    assert not any(payloads[0][i:i + 32] in stored for i in range(0, PAYLOAD_BYTES - 32, 997))
    assert sealed_tier.exists_prefix(keys, 0, namespace=TENANT) == 3 and sealed_tier.num_corrupt == 0
    # Step: another namespace (its name, or the value replayed under it), a tier in clear, another
    # master key: none of them reads it.
    assert read(sealed_tier, keys[0], namespace="tenant-b")[0] is ReadResult.MISSING
    backend.raw_set(sealed_tier.name_for(keys[0], 0, "tenant-b"), stored)
    assert read(sealed_tier, keys[0], namespace="tenant-b")[0] is ReadResult.UNREADABLE
    clear = backend.open(None, TIMEOUT_S)
    assert read(clear, keys[1])[0] is ReadResult.UNREADABLE
    other = backend.open(None, TIMEOUT_S, sealer=Sealer(os.urandom(32)))
    assert read(other, keys[2], namespace=TENANT)[0] is ReadResult.UNREADABLE
    # the wrong master key and the tier in clear left every value for the right key
    assert [read(sealed_tier, key, namespace=TENANT)[0] for key in keys[1:3]] == [ReadResult.OK] * 2
    clear.close()
    other.close()


def test_encrypted_reads_in_groups(monkeypatch: pytest.MonkeyPatch, sealed_tier: RemoteTier) -> None:
    monkeypatch.setattr(remote_reads, "SEALED_GROUP_BYTES", 3 * PAYLOAD_BYTES)  # groups of 4 (the minimum)
    keys = [new_key() for _ in range(10)]
    payloads = [payload_of() for _ in keys]
    for key, payload in zip(keys, payloads):
        assert sealed_tier.put(key, 0, payload, LAYOUT, namespace=TENANT)
    outs = [bytearray(PAYLOAD_BYTES) for _ in keys]
    results = sealed_tier.get_many_into([(key, memoryview(out)) for key, out in zip(keys, outs)], 0, LAYOUT,
                                        namespace=TENANT)
    assert results == [ReadResult.OK] * 10 and [bytes(out) for out in outs] == payloads


SEALED_TAMPERING: dict[str, Callable[[bytes, bytes], bytes]] = {  # (stored value, another key's value) -> new value
    **TAMPERING,
    "tag byte flipped, checksums forged": lambda value, other: forged(flip_byte(value, len(value) - 1)),
    "another key's value, checksums forged": lambda value, other: forged(value, stored=other[HEADER_BYTES:]),
}


@pytest.mark.parametrize("tampering", list(SEALED_TAMPERING))
def test_bad_encrypted_values_are_misses(backend: Backend, sealed_tier: RemoteTier, tampering: str) -> None:
    # Values that fail a header or checksum check are corrupt and deleted. Values that pass them
    # (checksums forged) but do not authenticate look exactly like another master key's: misses
    # left in place, so that a reader with the wrong key never wipes the store.
    key, neighbour, other = new_key(), new_key(), new_key()
    for each in (key, neighbour, other):
        assert sealed_tier.put(each, 0, payload_of(), LAYOUT, namespace=TENANT)
    name = sealed_tier.name_for(key, 0, TENANT)
    stored, other_value = backend.raw_get(name), backend.raw_get(sealed_tier.name_for(other, 0, TENANT))
    assert stored is not None and other_value is not None
    backend.raw_set(name, SEALED_TAMPERING[tampering](stored, other_value))
    outs = [bytearray(PAYLOAD_BYTES), bytearray(PAYLOAD_BYTES)]
    results = sealed_tier.get_many_into([(key, memoryview(outs[0])), (neighbour, memoryview(outs[1]))], 0, LAYOUT,
                                        namespace=TENANT)
    if "checksums forged" in tampering:
        assert results == [ReadResult.UNREADABLE, ReadResult.OK]
        assert sealed_tier.num_unreadable == 1 and sealed_tier.num_corrupt == 0 and sealed_tier.healthy
        assert backend.raw_get(name) is not None  # left in place
    else:
        assert results == [ReadResult.CORRUPT, ReadResult.OK]
        assert sealed_tier.num_corrupt == 1 and sealed_tier.healthy
        assert backend.raw_get(name) is None  # deleted


def test_swapped_encrypted_values_read_corrupt(backend: Backend, sealed_tier: RemoteTier,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # Step: two keys' values swapped server-side, as they are and with headers forged to match the names.
    for forge_headers in (False, True):
        one, two = new_key(), new_key()
        assert sealed_tier.put(one, 0, payload_of(), LAYOUT, namespace=TENANT)
        assert sealed_tier.put(two, 0, payload_of(), LAYOUT, namespace=TENANT)
        names = [sealed_tier.name_for(one, 0, TENANT), sealed_tier.name_for(two, 0, TENANT)]
        values = [backend.raw_get(name) for name in names]
        assert values[0] is not None and values[1] is not None
        swapped = [values[1], values[0]]
        if forge_headers:
            swapped = [forged(value, key=key) for value, key in zip(swapped, (one, two))]
        for name, value in zip(names, swapped):
            backend.raw_set(name, value)
        caplog.clear()
        # headers as they are: the key check refuses them (deleted); forged: the tag does (kept)
        expected = ReadResult.UNREADABLE if forge_headers else ReadResult.CORRUPT
        assert read(sealed_tier, one, namespace=TENANT)[0] is expected
        assert read(sealed_tier, two, namespace=TENANT)[0] is expected
        assert all((backend.raw_get(name) is None) != forge_headers for name in names)
        # Forged headers pass every header check: the GCM tag is what refuses them.
        assert caplog.text.count("does not authenticate") == (2 if forge_headers else 0)


def test_encrypted_value_replayed_under_another_key_reads_corrupt(backend: Backend, sealed_tier: RemoteTier) -> None:
    key, target = new_key(), new_key()
    payload = payload_of()
    assert sealed_tier.put(key, 0, payload, LAYOUT, namespace=TENANT)
    value = backend.raw_get(sealed_tier.name_for(key, 0, TENANT))
    assert value is not None
    backend.raw_set(sealed_tier.name_for(target, 0, TENANT), forged(value, key=target))
    assert read(sealed_tier, target, namespace=TENANT)[0] is ReadResult.UNREADABLE
    assert read(sealed_tier, key, namespace=TENANT) == (ReadResult.OK, payload)


# --------------------------------------------------------------------------------------- faults

# ---- compression -----------------------------------------------------------------------------------

CODEC_LAYOUT = KVLayout("cpu_lbhnc", 4, 2, 64, 16, "bfloat16")
CODEC = KVCodec(CODEC_LAYOUT, 256)
CHUNK_BYTES = CODEC_LAYOUT.chunk_bytes(256)


def kv_chunk(seed: int) -> bytes:
    """A bf16 chunk whose values drift smoothly over tokens, as K and V do."""
    rng = np.random.default_rng(seed)
    values = np.cumsum(rng.normal(0, 0.05, CHUNK_BYTES // 2), dtype=np.float32) % 8 - 4
    return (values.view(np.uint32) >> 16).astype("<u2").tobytes()


def decoded(chunk: bytes) -> bytes:
    """What a compressed ``chunk`` reads back as (the codec is deterministic)."""
    encoded = CODEC.encode(memoryview(chunk))
    assert encoded is not None
    out = bytearray(len(chunk))
    CODEC.decode_into(encoded, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("sealer", [None, SEALER], ids=["clear", "sealed"])
def test_compressed_round_trip(backend: Backend, sealer: Sealer | None) -> None:
    compressed = backend.open(None, TIMEOUT_S, sealer=sealer, codec=CODEC)
    plain = backend.open(None, TIMEOUT_S, sealer=sealer)
    keys = [new_key() for _ in range(4)]
    chunks = [kv_chunk(index) for index in range(4)]
    assert all(compressed.put(key, 0, chunk, CODEC_LAYOUT.fingerprint(), namespace=TENANT)
               for key, chunk in zip(keys[:3], chunks[:3]))
    assert plain.put(keys[3], 0, chunks[3], CODEC_LAYOUT.fingerprint(), namespace=TENANT)
    # Step: the server holds compressed values, several times smaller than the chunk.
    stored = backend.raw_get(compressed.name_for(keys[0], 0, TENANT))
    assert stored is not None and len(stored) < CHUNK_BYTES / 3
    assert decode_header(stored).codec == CODEC_CACHEGEN | (CODEC_AES256_GCM if sealer else 0)
    # Step: one batch reads compressed values (decoded), an uncompressed one (exact) and a miss.
    outs = [bytearray(CHUNK_BYTES) for _ in range(5)]
    items = [(key, memoryview(out)) for key, out in zip([*keys, new_key()], outs)]
    assert compressed.get_many_into(items, 0, CODEC_LAYOUT.fingerprint(), namespace=TENANT) == \
        [ReadResult.OK] * 4 + [ReadResult.MISSING]
    assert [bytes(out) for out in outs[:3]] == [decoded(chunk) for chunk in chunks[:3]]
    assert bytes(outs[3]) == chunks[3]
    # Step: a tier without compression cannot open a compressed value (a miss, left in place); a
    # truncated value is corrupt (and deleted).
    assert plain.get_into(keys[0], 0, memoryview(outs[0]), CODEC_LAYOUT.fingerprint(), namespace=TENANT) \
        is ReadResult.UNREADABLE
    backend.raw_set(compressed.name_for(keys[1], 0, TENANT), stored[:len(stored) - 100])
    assert compressed.get_into(keys[1], 0, memoryview(outs[1]), CODEC_LAYOUT.fingerprint(), namespace=TENANT) \
        is ReadResult.CORRUPT
    assert compressed.exists_prefix(keys[1:2], 0, namespace=TENANT) == 0
    compressed.close()
    plain.close()


def test_closed_port_at_start_is_unhealthy_not_an_error(backend: Backend) -> None:
    started = time.monotonic()
    tier = backend.open_unreachable(1.0)
    key = new_key()
    assert not tier.healthy and tier.num_errors == 1
    assert tier.exists_prefix([key], 0, namespace=TENANT) == 0
    assert read(tier, key)[0] is ReadResult.MISSING
    assert tier.put(key, 0, payload_of(), LAYOUT, namespace=TENANT) is False
    assert tier.delete([key], 0, namespace=TENANT) == 0
    assert tier.num_errors == 1  # backing off: no further attempt
    assert time.monotonic() - started < 1.0 + 1.5
    assert 0 < tier.retry_after_s <= 1.0
    tier.close()


def assert_misses(tier: RemoteTier, key: bytes) -> None:
    assert read(tier, key)[0] is ReadResult.MISSING
    assert tier.exists_prefix([key], 0, namespace=TENANT) == 0
    assert tier.put(new_key(), 0, payload_of(), LAYOUT, namespace=TENANT) is False
    assert tier.delete([key], 0, namespace=TENANT) == 0


def wait_for_probe(tier: RemoteTier) -> None:
    time.sleep(tier.retry_after_s + 0.01)


def check_kill_and_restart(server: ServerProcess, tier: RemoteTier, persistent: bool) -> None:
    key, payload = new_key(), payload_of()
    assert tier.put(key, 0, payload, LAYOUT, namespace=TENANT)
    server.kill()
    assert read(tier, key)[0] is ReadResult.MISSING  # the failing call
    assert not tier.healthy and tier.num_errors == 1
    assert_misses(tier, key)  # backing off: immediate misses
    assert tier.num_errors == 1
    wait_for_probe(tier)
    assert_misses(tier, key)  # the probe fails too: longer backoff
    assert tier.num_errors == 2 and 1.0 < tier.retry_after_s <= 2.0
    server.start()
    assert read(tier, key)[0] is ReadResult.MISSING  # still backing off
    wait_for_probe(tier)
    assert tier.exists_prefix([key], 0, namespace=TENANT) == (1 if persistent else 0)  # the probe succeeds
    assert tier.healthy
    assert tier.put(key, 0, payload, LAYOUT, namespace=TENANT)
    assert read_eventually(tier, key) == (ReadResult.OK, payload)


def read_eventually(tier: RemoteTier, key: bytes, timeout_s: float = 20.0) -> tuple[ReadResult, bytes]:
    """Read until OK: a restarted SeaweedFS answers HEAD and PUT before its volume serves GETs
    (InternalError for a moment), which the tier rightly treats as a failure and backs off from."""
    deadline = time.monotonic() + timeout_s
    result = read(tier, key)
    while result[0] is not ReadResult.OK and time.monotonic() < deadline:
        wait_for_probe(tier)
        result = read(tier, key)
    return result


def test_redis_killed_mid_run_then_restarted(fresh_redis: ServerProcess) -> None:
    tier = open_remote(f"redis://127.0.0.1:{port_of(fresh_redis)}", ttl_s=None, timeout_s=TIMEOUT_S)
    check_kill_and_restart(fresh_redis, tier, persistent=False)
    tier.close()


def test_s3_killed_mid_run_then_restarted(fresh_seaweed: tuple[ServerProcess, str]) -> None:
    server, endpoint = fresh_seaweed
    tier = s3_backend(endpoint).open(None, TIMEOUT_S)
    check_kill_and_restart(server, tier, persistent=True)
    tier.close()


def check_deadline(server: ServerProcess, tier: RemoteTier, timeout_s: float) -> None:
    key, payload = new_key(), payload_of()
    assert tier.put(key, 0, payload, LAYOUT, namespace=TENANT)
    server.pause()  # connections are accepted by the kernel, nothing answers
    try:
        started = time.monotonic()
        outs = [bytearray(PAYLOAD_BYTES) for _ in range(8)]
        results = tier.get_many_into([(key, memoryview(out)) for out in outs], 0, LAYOUT, namespace=TENANT)
        elapsed_s = time.monotonic() - started
        assert results == [ReadResult.MISSING] * 8 and not tier.healthy
        assert elapsed_s < timeout_s + 0.5, f"took {elapsed_s:.2f} s with timeout_s={timeout_s}"
        started = time.monotonic()
        assert_misses(tier, key)
        assert time.monotonic() - started < 0.05  # backing off: no network
    finally:
        server.resume()
    wait_for_probe(tier)
    assert read(tier, key) == (ReadResult.OK, payload) and tier.healthy


def test_redis_deadline_on_a_stalled_server(fresh_redis: ServerProcess) -> None:
    tier = open_remote(f"redis://127.0.0.1:{port_of(fresh_redis)}", ttl_s=None, timeout_s=0.5)
    check_deadline(fresh_redis, tier, 0.5)
    tier.close()


def test_s3_deadline_on_a_stalled_server(seaweed: tuple[ServerProcess, str]) -> None:
    server, endpoint = seaweed
    tier = s3_backend(endpoint).open(None, 0.5)
    check_deadline(server, tier, 0.5)
    tier.close()


# --------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize("url", ["memcached://h:1", "redis:/h", "redis://h:1,h:2", "redis://h:x",
                                 "redis+cluster://h:1/3", "redis://h:1/db", "s3://"])
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="remote.url"):
        open_remote(url, ttl_s=None, timeout_s=1.0)


def test_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="remote.timeout_s"):
        open_remote("redis://127.0.0.1:1", ttl_s=None, timeout_s=0)
    with pytest.raises(ConfigError, match="remote.ttl_s"):
        open_remote("redis://127.0.0.1:1", ttl_s=0, timeout_s=1.0)


@pytest.mark.parametrize(("url", "library"), [("redis://127.0.0.1:1", "redis"), ("s3://bucket", "boto3")])
def test_missing_client_library_names_the_install_step(monkeypatch: pytest.MonkeyPatch, url: str,
                                                       library: str) -> None:
    for module in [name for name in sys.modules if name.startswith("kvtier.tiers.") and name.endswith("_tier")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, library, None)  # import raises ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"pip install 'kvtier\[remote\]'"):
        open_remote(url, ttl_s=None, timeout_s=1.0)


def test_object_names() -> None:
    key = bytes(range(16))
    assert object_name(key, 3, "tenant-a") == f"kvtier/tenant-a/{key.hex()}.3"
    for name in ("", ".", "..", "a/b", "a*", "a?"):  # never a path, never a glob
        with pytest.raises(ValueError):
            object_name(key, 3, name)


# ----- encryption in transit: a CA made in the test, servers that verify client certificates -----------

@pytest.mark.parametrize("name", ["redis-tls", "s3-tls"])
def test_tls_servers_refuse_clients_without_the_right_certificates(request: pytest.FixtureRequest, name: str) -> None:
    """The contract suite runs whole on both TLS servers with CA and client certificate; here, a
    client missing either is refused (the tier is unhealthy, every call a miss), never served in clear."""
    if name == "redis-tls":
        _, tls, port = request.getfixturevalue("redis_tls_server")
        url, extra = f"rediss://127.0.0.1:{port}", {"username": TLS_USER, "password": TLS_PASSWORD}
    else:
        _, endpoint, tls = request.getfixturevalue("seaweed_tls")
        url = f"s3://{S3_BUCKET}/tls-refusals"
        extra = {"s3_endpoint": endpoint, "s3_region": "us-east-1", "access_key": S3_ACCESS_KEY,
                 "secret_key": S3_SECRET_KEY}
    good = open_remote(url, ttl_s=None, timeout_s=TIMEOUT_S, **extra, **tls_options(tls))
    assert good.healthy and good.put(new_key(), 0, payload_of(1024), LAYOUT, namespace=TENANT)
    good.close()
    no_client_cert = open_remote(url, ttl_s=None, timeout_s=TIMEOUT_S, tls_ca=tls.ca, **extra)
    unknown_ca = open_remote(url, ttl_s=None, timeout_s=TIMEOUT_S, tls_cert=tls.client_cert,
                             tls_key=tls.client_key, **extra)  # the system's CAs do not know the test CA
    for tier in (no_client_cert, unknown_ca):
        assert not tier.healthy
        assert tier.put(new_key(), 0, payload_of(1024), LAYOUT, namespace=TENANT) is False
        tier.close()


def test_concurrent_first_connections_all_present_the_client_certificate(request: pytest.FixtureRequest) -> None:
    """Fresh tiers opening many connections from many threads at once: urllib3 would load the
    certificate into the shared TLS context per connection, racing with other handshakes (a
    handshake without it, or a crash); the tier loads it once (``s3_tier._OneContextSession``)."""
    import concurrent.futures

    backend = make_backend(request, "s3-tls")
    for _ in range(10):
        tier = backend.open(None, TIMEOUT_S)
        client = tier.client  # type: ignore[attr-defined]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: client.head_bucket(Bucket=S3_BUCKET), range(32)))  # raises if refused
        tier.close()


def test_client_certificate_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="remote.tls_key"):
        open_remote("rediss://127.0.0.1:1", ttl_s=None, timeout_s=1.0, tls_cert=str(tmp_path))
    with pytest.raises(ConfigError, match="remote.tls_ca: file not found"):
        open_remote("rediss://127.0.0.1:1", ttl_s=None, timeout_s=1.0, tls_ca=str(tmp_path / "missing.crt"))


def test_redis_reads_are_bounded_and_typed(fresh_redis: ServerProcess) -> None:
    # A 64 MiB value planted under an entry's name is not read into memory; a list under another
    # entry's name is one corrupt entry (deleted, counted), not a failed batch or an unhealthy tier.
    tier = open_remote(f"redis://127.0.0.1:{port_of(fresh_redis)}/0", ttl_s=None, timeout_s=TIMEOUT_S)
    try:
        big, listed, good = new_key(), new_key(), new_key()
        payload = payload_of()
        assert tier.put(good, 0, payload, LAYOUT, namespace=TENANT)
        client = tier.client  # type: ignore[attr-defined]
        client.set(tier.name_for(big, 0, TENANT), b"\0" * (64 << 20))
        client.rpush(tier.name_for(listed, 0, TENANT), b"a", b"b")
        sent_before = int(client.info("stats")["total_net_output_bytes"])
        outs = [bytearray(PAYLOAD_BYTES) for _ in range(3)]
        results = tier.get_many_into([(key, memoryview(out)) for key, out in zip((big, listed, good), outs)], 0,
                                     LAYOUT, namespace=TENANT)
        sent = int(client.info("stats")["total_net_output_bytes"]) - sent_before
        assert results == [ReadResult.CORRUPT, ReadResult.CORRUPT, ReadResult.OK]
        assert bytes(outs[2]) == payload and tier.healthy and tier.num_corrupt == 2
        assert sent < 4 * PAYLOAD_BYTES  # not the 64 MiB
        assert client.exists(tier.name_for(big, 0, TENANT), tier.name_for(listed, 0, TENANT)) == 0  # deleted
    finally:
        tier.close()
