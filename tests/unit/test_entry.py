"""The entry format: round trip, and every kind of damage is an EntryError, never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.entry import HEADER_BYTES, EntryHeader, check_entry, decode_header, encode_header, payload_checksum
from kvtier.errors import EntryError

KEY = bytes(range(16))
LAYOUT = bytes(range(100, 116))

headers = st.builds(
    EntryHeader,
    key=st.binary(min_size=16, max_size=16),
    rank=st.integers(0, 2**32 - 1),
    layout_fingerprint=st.binary(min_size=16, max_size=16),
    codec=st.integers(0, 2**16 - 1),
    payload_bytes=st.integers(0, 2**64 - 1),
    payload_checksum=st.binary(min_size=16, max_size=16),
)


def make_entry(payload: bytes, key: bytes = KEY, rank: int = 3) -> bytes:
    header = EntryHeader(key, rank, LAYOUT, 0, len(payload), payload_checksum(payload))
    return encode_header(header) + payload


def check_bytes(entry: bytes, key: bytes = KEY, rank: int = 3) -> None:
    """Decode and check ``entry`` as a reader expecting (key, rank, LAYOUT) would."""
    header = decode_header(entry)
    check_entry(header, key, rank, LAYOUT, memoryview(entry)[HEADER_BYTES:])


@given(headers)
def test_header_round_trip(header: EntryHeader) -> None:
    encoded = encode_header(header)
    assert len(encoded) == HEADER_BYTES
    assert decode_header(encoded) == header
    assert decode_header(encoded + b"trailing payload") == header


@given(st.binary(max_size=512))
def test_entry_round_trip(payload: bytes) -> None:
    check_bytes(make_entry(payload))


def test_header_is_fixed_little_endian() -> None:
    encoded = encode_header(EntryHeader(KEY, 1, LAYOUT, 0, 5, payload_checksum(b"hello")))
    assert encoded[:4] == b"KVT1"
    assert encoded[4:6] == b"\x01\x00"  # version 1, little-endian
    assert encoded[24:28] == b"\x01\x00\x00\x00"  # rank


def test_every_single_byte_flip_is_detected() -> None:
    entry = make_entry(bytes(range(200)) * 3)
    for offset in range(len(entry)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(entry)
            damaged[offset] ^= flip
            with pytest.raises(EntryError):
                check_bytes(bytes(damaged))


def test_every_truncation_is_detected() -> None:
    entry = make_entry(b"x" * 300)
    for length in range(len(entry)):
        with pytest.raises(EntryError):
            check_bytes(entry[:length])


@pytest.mark.parametrize("mutate, reason", [
    (lambda e: b"KVT2" + e[4:], "magic"),
    (lambda e: e[:4] + b"\x02\x00" + e[6:], "version"),
    (lambda e: e[:10] + bytes([e[10] ^ 1]) + e[11:], "header checksum"),
    (lambda e: e[:20], "short"),
])
def test_decode_names_the_reason(mutate, reason: str) -> None:
    with pytest.raises(EntryError, match=reason):
        decode_header(mutate(make_entry(b"payload")))


@pytest.mark.parametrize("key, rank, layout, payload, reason", [
    (bytes(16), 3, LAYOUT, b"payload", "key mismatch"),
    (KEY, 4, LAYOUT, b"payload", "rank mismatch"),
    (KEY, 3, bytes(16), b"payload", "layout mismatch"),
    (KEY, 3, LAYOUT, b"payloa", "length mismatch"),
    (KEY, 3, LAYOUT, b"Payload", "checksum mismatch"),
])
def test_check_entry_names_the_mismatch(key, rank, layout, payload, reason: str) -> None:
    header = decode_header(make_entry(b"payload"))
    with pytest.raises(EntryError, match=reason):
        check_entry(header, key, rank, layout, payload)


@settings(max_examples=500)
@given(st.binary(max_size=2 * HEADER_BYTES))
def test_decode_of_random_bytes_raises_only_entry_error(data: bytes) -> None:
    try:
        decode_header(data)
    except EntryError:
        pass


@settings(max_examples=300)
@given(st.binary(min_size=HEADER_BYTES - 8, max_size=HEADER_BYTES - 8))
def test_decode_of_random_fields_with_valid_frame_raises_only_entry_error(fields: bytes) -> None:
    # Valid magic and version make the fuzzer reach the checksum check.
    try:
        decode_header(b"KVT1\x01\x00" + fields[6:] + bytes(8))
    except EntryError:
        pass


def test_checksum_reads_buffers_in_place() -> None:
    data = bytearray(b"abc" * 1000)
    expected = payload_checksum(bytes(data))
    assert payload_checksum(data) == expected
    assert payload_checksum(memoryview(data)) == expected
    assert payload_checksum(memoryview(bytearray(b"zz") + data)[2:]) == expected


def test_header_rejects_bad_field_sizes() -> None:
    with pytest.raises(ValueError):
        EntryHeader(b"short", 0, LAYOUT, 0, 0, bytes(16))
    with pytest.raises(ValueError):
        EntryHeader(KEY, -1, LAYOUT, 0, 0, bytes(16))
