"""Fuzzing every parser of bytes that come from a tier (issue 6, item 8).

Each parser gets arbitrary bytes and mutations of valid input. The contract under test: a miss
(``ReadResult.CORRUPT`` / ``MISSING``, ``False``) or ``EntryError`` / ``ValueError`` where the
parser documents it, never any other exception, never a success for changed bytes, and never a
write outside the caller's ``out`` buffer (guard bytes around it stay as they were).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvtier.compression import KVCodec
from kvtier.crypto import SEAL_OVERHEAD_BYTES, Sealer, parse_master_key
from kvtier.entry import CODEC_AES256_GCM, HEADER_BYTES, check_entry, decode_header, sealed_aad
from kvtier.errors import EntryError
from kvtier.layout import KVLayout
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.framing import frame, unframe_into
from kvtier.tiers.remote import Fetched
from tests.dict_tier import DictTier

KEY = bytes(range(16))
LAYOUT = bytes(range(100, 116))
SEALER = Sealer(bytes(range(32)))
NAMESPACE = "tenant-a"
PAYLOAD_BYTES = 96
PAYLOAD = bytes(range(PAYLOAD_BYTES))
GUARD = b"\xa5" * 32
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def guarded_out(num_bytes: int) -> tuple[bytearray, memoryview]:
    """A buffer of ``num_bytes`` bytes between two guard runs, and the view of its middle."""
    pool = bytearray(GUARD + b"\x00" * num_bytes + GUARD)
    return pool, memoryview(pool)[len(GUARD):len(GUARD) + num_bytes]


def guards_intact(pool: bytearray) -> bool:
    return pool[:len(GUARD)] == GUARD and pool[-len(GUARD):] == GUARD


def entry_of(sealer: Sealer | None, payload: bytes = PAYLOAD, key: bytes = KEY, rank: int = 0) -> bytes:
    header, stored = frame(key, rank, LAYOUT, memoryview(payload), sealer, NAMESPACE, None)
    return header + bytes(stored)


@st.composite
def changed(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with at least one change: flipped bytes, a truncation, or bytes appended."""
    kind = draw(st.sampled_from(["flip", "truncate", "append"]))
    if kind == "truncate":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "append":
        return valid + draw(st.binary(min_size=1, max_size=64))
    data = bytearray(valid)
    for index, mask in draw(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)),
                                     min_size=1, max_size=4, unique_by=lambda flip: flip[0])):
        data[index] ^= mask
    return bytes(data)


CLEAR_ENTRY = entry_of(None)
SEALED_ENTRY = entry_of(SEALER)
SEALERS = pytest.mark.parametrize("sealer", [None, SEALER], ids=["clear", "sealed"])

# Compressed entries: a small real layout (the codec declines chunks its tables would outgrow).
CODEC_LAYOUT = KVLayout("packed_hnd", 2, 2, 16, 16, "bfloat16")
CODEC = KVCodec(CODEC_LAYOUT, 16)
CHUNK = (np.sin(np.arange(CODEC_LAYOUT.chunk_bytes(16) // 2, dtype=np.float32) / 7) * 3).astype(np.float32)
CHUNK_BYTES = ((CHUNK.view(np.uint32) >> 16).astype("<u2")).tobytes()
ENCODED = CODEC.encode(memoryview(CHUNK_BYTES))
assert ENCODED is not None


def codec_entry_of(sealer: Sealer | None) -> bytes:
    header, stored = frame(KEY, 0, LAYOUT, memoryview(CHUNK_BYTES), sealer, NAMESPACE, CODEC)
    return header + bytes(stored)


COMPRESSED_ENTRY = codec_entry_of(None)
SEALED_COMPRESSED_ENTRY = codec_entry_of(SEALER)


# ---- entry header and checks -----------------------------------------------------------------------

@SETTINGS
@given(st.one_of(st.binary(max_size=3 * HEADER_BYTES), changed(CLEAR_ENTRY), changed(SEALED_ENTRY)),
       st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1))
def test_decode_and_check_raise_only_entry_error(data: bytes, key: bytes, rank: int) -> None:
    try:
        header = decode_header(data)
        check_entry(header, key, rank, LAYOUT, data[HEADER_BYTES:])
    except EntryError:
        return
    assert data[:HEADER_BYTES] in (CLEAR_ENTRY[:HEADER_BYTES], SEALED_ENTRY[:HEADER_BYTES])


@SETTINGS
@given(data=st.one_of(st.binary(max_size=2 * HEADER_BYTES + PAYLOAD_BYTES + SEAL_OVERHEAD_BYTES),
                      changed(CLEAR_ENTRY), changed(SEALED_ENTRY)),
       sealer=st.sampled_from([None, SEALER]))
def test_unframe_raises_only_entry_error_and_writes_only_out(data: bytes, sealer: Sealer | None) -> None:
    pool, out = guarded_out(PAYLOAD_BYTES)
    stored = out if sealer is None else memoryview(bytearray(data[HEADER_BYTES:]))
    if sealer is None:
        chunk = data[HEADER_BYTES:HEADER_BYTES + PAYLOAD_BYTES]
        out[:len(chunk)] = chunk
    try:
        unframe_into(data[:HEADER_BYTES], stored, KEY, 0, LAYOUT, out, sealer, NAMESPACE, None)
    except EntryError:
        assert guards_intact(pool)
        return
    # Accepted: only the valid clear entry's bytes (in clear the caller checks the total length).
    assert sealer is None and data[:HEADER_BYTES + PAYLOAD_BYTES] == CLEAR_ENTRY


@SETTINGS
@given(st.one_of(st.binary(max_size=2 * len(ENCODED)), changed(ENCODED)))
def test_codec_decode_raises_only_entry_error_and_writes_only_out(data: bytes) -> None:
    pool, out = guarded_out(len(CHUNK_BYTES))
    try:
        CODEC.decode_into(data, out)
    except EntryError:
        pass  # a flipped bit in a scale may still decode (to other values): the entry's checksum
        # and seal, checked before the codec runs, are what refuse changed bytes
    assert guards_intact(pool)


# ---- the sealer ------------------------------------------------------------------------------------

SEALED_PAYLOAD = bytes(SEALED_ENTRY[HEADER_BYTES:])
AAD = sealed_aad(KEY, 0, LAYOUT, CODEC_AES256_GCM)


@SETTINGS
@given(sealed=st.one_of(st.binary(max_size=2 * SEAL_OVERHEAD_BYTES + PAYLOAD_BYTES), changed(SEALED_PAYLOAD)),
       num_bytes=st.integers(0, PAYLOAD_BYTES + 8))
def test_open_into_of_bad_bytes_is_false_and_writes_only_out(sealed: bytes, num_bytes: int) -> None:
    pool, out = guarded_out(num_bytes)
    assert SEALER.open_into(NAMESPACE.encode(), AAD, sealed, out) is False
    assert guards_intact(pool)
    assert bytes(out) == bytes(num_bytes)


@SETTINGS
@given(context=st.binary(max_size=70), aad=st.binary(max_size=80))
def test_open_into_under_any_other_context_or_aad_is_false(context: bytes, aad: bytes) -> None:
    assume((context, aad) != (NAMESPACE.encode(), AAD))
    pool, out = guarded_out(PAYLOAD_BYTES)
    assert SEALER.open_into(context, aad, SEALED_PAYLOAD, out) is False
    assert guards_intact(pool)


@SETTINGS
@given(st.binary(max_size=200))
def test_master_key_parser_returns_a_key_or_raises_value_error(text: bytes) -> None:
    try:
        key = parse_master_key(text)
    except ValueError:
        return
    assert len(key) == 32


# ---- the disk tier ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def disk_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fuzz-disk"))


@SEALERS
@SETTINGS
@given(content=st.one_of(st.binary(max_size=2 * HEADER_BYTES + PAYLOAD_BYTES + SEAL_OVERHEAD_BYTES),
                         changed(CLEAR_ENTRY), changed(SEALED_ENTRY)))
def test_disk_read_of_any_file_is_corrupt(disk_root: str, sealer: Sealer | None, content: bytes) -> None:
    files = DiskFiles(disk_root, LAYOUT, sealer=sealer)
    path = files.path_for(KEY, 0, NAMESPACE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    pool, out = guarded_out(PAYLOAD_BYTES)
    result = files.read_into(KEY, 0, out, namespace=NAMESPACE)
    # a miss: corrupt and removed, or (a valid-looking entry of another key or setting) left in place
    assert result in (ReadResult.CORRUPT, ReadResult.UNREADABLE)
    assert guards_intact(pool)
    assert os.path.exists(path) == (result is ReadResult.UNREADABLE)


@SEALERS
def test_disk_read_of_the_valid_entry_is_ok(disk_root: str, sealer: Sealer | None) -> None:
    # The other side of the fuzz test above: the unchanged bytes do load.
    files = DiskFiles(disk_root, LAYOUT, sealer=sealer)
    files.delete([KEY], 0, namespace=NAMESPACE)  # what the fuzz test left there (an entry is never replaced)
    files.write(KEY, 0, PAYLOAD, namespace=NAMESPACE)
    pool, out = guarded_out(PAYLOAD_BYTES)
    assert files.read_into(KEY, 0, out, namespace=NAMESPACE) is ReadResult.OK
    assert bytes(out) == PAYLOAD and guards_intact(pool)


# ---- the remote read path --------------------------------------------------------------------------

@SEALERS
@SETTINGS
@given(value=st.one_of(st.binary(max_size=2 * HEADER_BYTES + PAYLOAD_BYTES + SEAL_OVERHEAD_BYTES),
                       changed(CLEAR_ENTRY), changed(SEALED_ENTRY)))
def test_remote_read_of_any_value_is_corrupt(sealer: Sealer | None, value: bytes) -> None:
    tier = DictTier(sealer)
    name = tier.name_for(KEY, 0, NAMESPACE)
    tier.values[name] = value
    pool, out = guarded_out(PAYLOAD_BYTES)
    result = tier.get_into(KEY, 0, out, LAYOUT, namespace=NAMESPACE)
    assert result in (ReadResult.CORRUPT, ReadResult.UNREADABLE)
    assert guards_intact(pool)
    assert tier.num_corrupt + tier.num_unreadable == 1 and tier.healthy
    assert (name in tier.values) == (result is ReadResult.UNREADABLE)


@SEALERS
@SETTINGS
@given(value=st.one_of(st.binary(max_size=2 * HEADER_BYTES), changed(COMPRESSED_ENTRY),
                       changed(SEALED_COMPRESSED_ENTRY)))
def test_remote_read_of_any_compressed_value_is_corrupt(sealer: Sealer | None, value: bytes) -> None:
    tier = DictTier(sealer, CODEC)
    name = tier.name_for(KEY, 0, NAMESPACE)
    tier.values[name] = value
    pool, out = guarded_out(len(CHUNK_BYTES))
    result = tier.get_into(KEY, 0, out, LAYOUT, namespace=NAMESPACE)
    assert result in (ReadResult.CORRUPT, ReadResult.UNREADABLE)
    assert guards_intact(pool)
    assert tier.num_corrupt + tier.num_unreadable == 1 and tier.healthy
    assert (name in tier.values) == (result is ReadResult.UNREADABLE)
    assert tier.value_bytes_read == 0  # a bad value is not counted as data moved


@SEALERS
def test_remote_read_of_a_valid_compressed_value_is_ok_and_needs_the_codec(sealer: Sealer | None) -> None:
    tier = DictTier(sealer, CODEC)
    assert tier.put(KEY, 0, CHUNK_BYTES, LAYOUT, namespace=NAMESPACE)
    name = tier.name_for(KEY, 0, NAMESPACE)
    assert len(tier.values[name]) < HEADER_BYTES + len(CHUNK_BYTES)
    assert tier.value_bytes_written == len(tier.values[name]) and tier.value_bytes_read == 0
    pool, out = guarded_out(len(CHUNK_BYTES))
    assert tier.get_into(KEY, 0, out, LAYOUT, namespace=NAMESPACE) is ReadResult.OK
    assert tier.value_bytes_read == len(tier.values[name])  # what the wire carried, not the chunk
    expected = bytearray(len(CHUNK_BYTES))
    CODEC.decode_into(ENCODED, memoryview(expected))
    assert bytes(out) == expected and guards_intact(pool)
    plain = DictTier(sealer)
    plain.values = dict(tier.values)
    assert plain.get_into(KEY, 0, out, LAYOUT, namespace=NAMESPACE) is ReadResult.UNREADABLE
    assert name in plain.values  # left for the tiers with compression


@SETTINGS
@given(header=st.binary(max_size=2 * HEADER_BYTES), value_bytes=st.integers(0, 2**64 - 1),
       stored=st.binary(max_size=PAYLOAD_BYTES + SEAL_OVERHEAD_BYTES + 4), sealer=st.sampled_from([None, SEALER]))
def test_verify_of_any_fetched_value_is_corrupt(header: bytes, value_bytes: int, stored: bytes,
                                                sealer: Sealer | None) -> None:
    tier = DictTier(sealer)
    pool, out = guarded_out(PAYLOAD_BYTES)
    stored_view = out if sealer is None else memoryview(bytearray(stored))
    result = tier.reader.verify(Fetched(header, value_bytes), KEY, 0, LAYOUT, stored_view, out, "name", NAMESPACE)
    assert result in (ReadResult.CORRUPT, ReadResult.UNREADABLE)
    assert guards_intact(pool)


@SEALERS
def test_remote_read_of_the_valid_value_is_ok(sealer: Sealer | None) -> None:
    tier = DictTier(sealer)
    assert tier.put(KEY, 0, PAYLOAD, LAYOUT, namespace=NAMESPACE)
    pool, out = guarded_out(PAYLOAD_BYTES)
    assert tier.get_into(KEY, 0, out, LAYOUT, namespace=NAMESPACE) is ReadResult.OK
    assert bytes(out) == PAYLOAD and guards_intact(pool)
    assert tier.get_into(KEY, 0, out, LAYOUT, namespace="tenant-b") is ReadResult.MISSING  # another name
    tier.values[tier.name_for(KEY, 0, "tenant-b")] = tier.values[tier.name_for(KEY, 0, NAMESPACE)]  # replayed
    expected = ReadResult.OK if sealer is None else ReadResult.UNREADABLE  # in clear only the name separates
    assert tier.get_into(KEY, 0, out, LAYOUT, namespace="tenant-b") is expected
