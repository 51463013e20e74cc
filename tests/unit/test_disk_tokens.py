"""The tokens files of disk entries (``kvtier.tiers.disk_tokens``) and the start-up announcement of
a disk tier in vLLM's KV events (``KVEvents``): files round-trip (clear and sealed), anything else
reads as absent, they go where their entries go, and a restarted engine announces exactly the
entries whose tokens it kept."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kvtier.crypto import MASTER_KEY_BYTES, Sealer
from kvtier.store import DiskItem, DiskSettings
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.disk_tokens import ChunkRecord, ChunkTokenFiles, TokenWriter, decode, encode, tokens_path
from kvtier.plans import WorkerReport
from tests.unit.test_store import NS, key, make

CHUNK = 4
LAYOUT = b"\x01" * 16


@given(st.one_of(st.none(), st.binary(min_size=16, max_size=16)), st.lists(st.integers(0, 2**32 - 1), max_size=300),
       st.one_of(st.none(), st.text(max_size=40)))
def test_encode_decode_round_trip(parent: bytes | None, tokens: list[int], lora_name: str | None) -> None:
    record = ChunkRecord(parent, tokens, lora_name)
    assert decode(encode(record)) == record


@given(st.binary(max_size=64))
def test_random_bytes_never_decode_to_a_wrong_length(data: bytes) -> None:
    decoded = decode(data)
    name_bytes = 0 if decoded is None or decoded.lora_name is None else 2 + len(decoded.lora_name.encode())
    assert decoded is None or len(data) == 30 + 4 * len(decoded.tokens) + name_bytes


def test_version_1_files_and_cut_names_read_as_absent() -> None:
    # version 1 kept no adapter: its chunk might be an adapter's, announced as the base model's
    version_1 = b"KVTT\x01\x01" + b"\x05" * 16 + (2).to_bytes(4, "little") + bytes([7, 0, 0, 0, 8, 0, 0, 0])
    assert decode(version_1) is None
    assert decode(b"KVTT\x02" + version_1[5:]) == ChunkRecord(b"\x05" * 16, [7, 8], None)
    named = encode(ChunkRecord(None, [1], "sql"))
    assert decode(named[:-1]) is None and decode(named + b"x") is None
    assert decode(named[:-3] + b"\xff\xfe\xfd") is None  # not UTF-8


def test_a_file_round_trips_and_a_damaged_one_reads_as_absent(tmp_path: Path) -> None:
    files = ChunkTokenFiles(str(tmp_path), None)
    files.write(key(1), NS, ChunkRecord(None, [1, 2, 3, 4], None))
    files.write(key(2), NS, ChunkRecord(key(1), [5, 6, 7, 8], "sql"))
    assert files.read(key(1), NS) == (None, [1, 2, 3, 4], None)
    assert files.read(key(2), NS) == (key(1), [5, 6, 7, 8], "sql")
    assert files.read(key(3), NS) is None and files.read(key(1), "other") is None
    path = tokens_path(str(tmp_path), key(2), NS)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-1])  # torn write
    assert files.read(key(2), NS) is None


def test_a_link_or_a_fifo_in_place_of_a_tokens_file_reads_as_absent(tmp_path: Path) -> None:
    files = ChunkTokenFiles(str(tmp_path), None)
    files.write(key(1), NS, ChunkRecord(None, [1, 2], None))
    real = Path(tokens_path(str(tmp_path), key(1), NS))
    link = Path(tokens_path(str(tmp_path), key(2), NS))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(real)
    assert files.read(key(2), NS) is None and files.read(key(1), NS) is not None
    fifo = Path(tokens_path(str(tmp_path), key(3), NS))
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    assert files.read(key(3), NS) is None  # at once: a FIFO would block a start-up forever


def test_sealed_files_open_only_under_their_namespace_and_key(tmp_path: Path) -> None:
    sealer = Sealer(b"k" * MASTER_KEY_BYTES)
    files = ChunkTokenFiles(str(tmp_path), sealer)
    files.write(key(1), NS, ChunkRecord(key(9), [10, 20, 30, 40], None))
    path = Path(tokens_path(str(tmp_path), key(1), NS))
    assert b"\x0a\x00\x00\x00\x14\x00\x00\x00" not in path.read_bytes()  # tokens are not in clear
    assert files.read(key(1), NS) == (key(9), [10, 20, 30, 40], None)
    assert ChunkTokenFiles(str(tmp_path), None).read(key(1), NS) is None
    assert ChunkTokenFiles(str(tmp_path), Sealer(b"x" * MASTER_KEY_BYTES)).read(key(1), NS) is None
    other = Path(tokens_path(str(tmp_path), key(2), NS))
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(path.read_bytes())  # swapped onto another entry
    assert files.read(key(2), NS) is None
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert files.read(key(1), NS) is None


def test_tokens_go_where_their_entry_goes(tmp_path: Path) -> None:
    disk = DiskFiles(str(tmp_path), LAYOUT)
    tokens = ChunkTokenFiles(str(tmp_path), None)
    for i in (1, 2, 3):
        tokens.write(key(i), NS, ChunkRecord(None, [i] * CHUNK, None))
    disk.delete([key(1)], 1, namespace=NS)  # another rank's file: the tokens stay
    assert tokens.read(key(1), NS) is not None
    disk.delete([key(1)], 0, namespace=NS)
    assert tokens.read(key(1), NS) is None and tokens.read(key(2), NS) is not None
    assert disk.scan() == []  # tokens files are not entries
    assert tokens.remove_orphans([(key(3), NS)]) == 1
    assert tokens.read(key(2), NS) is None and tokens.read(key(3), NS) is not None
    disk.delete_namespace(NS)
    assert not os.path.exists(os.path.join(str(tmp_path), NS))


def test_the_writer_writes_off_thread_and_counts_what_the_disk_refuses(tmp_path: Path) -> None:
    writer = TokenWriter(ChunkTokenFiles(str(tmp_path), None))
    writer.submit(key(1), NS, ChunkRecord(None, [1, 2, 3, 4], None))
    writer.close()
    assert ChunkTokenFiles(str(tmp_path), None).read(key(1), NS) == (None, [1, 2, 3, 4], None)
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")
    writer = TokenWriter(ChunkTokenFiles(str(blocked), None))  # the root is a file: every write fails
    writer.submit(key(1), NS, ChunkRecord(None, [1], None))
    writer.close()
    assert writer.num_dropped == 1


def test_a_restarted_engine_announces_the_disk_entries_whose_tokens_it_kept(tmp_path: Path) -> None:
    from vllm.distributed.kv_events import BlockStored

    from kvtier.integrations.vllm.events import Adapter, KVEvents

    files = ChunkTokenFiles(str(tmp_path), None)
    files.write(key(1), NS, ChunkRecord(None, [1] * CHUNK, None))
    files.write(key(2), NS, ChunkRecord(key(1), [2] * CHUNK, None))
    files.write(key(5), NS, ChunkRecord(key(1), [5] * CHUNK, "sql"))  # another adapter's: its own event
    files.write(key(7), NS, ChunkRecord(None, [7] * CHUNK, None))  # its entry is gone: removed at start-up
    initial = [DiskItem(key(i), NS, 1.0 + i) for i in (1, 2, 3, 5)]  # key 3: written with events off
    store = make(disk=DiskSettings(8, write_through=True, initial=initial))
    events = KVEvents(CHUNK, 16, False, store.disk_books, files)
    store.events = events.log
    first = events.take()
    assert first == [BlockStored(block_hashes=[key(1), key(2)], parent_block_hash=None, token_ids=[1] * 4 + [2] * 4,
                                 block_size=CHUNK, lora_id=None, medium="DISK", lora_name=None),
                     BlockStored(block_hashes=[key(5)], parent_block_hash=key(1), token_ids=[5] * 4,
                                 block_size=CHUNK, lora_id=None, medium="DISK", lora_name="sql")]
    assert events.take() == [] and files.read(key(7), NS) is None
    # a chunk stored on disk from now on keeps its tokens for the next restart
    events.chunks.remember(key(4), key(2), [4] * CHUNK, Adapter(3, "chat"))
    assert store.prepare_store(key(4), NS) is not None
    store.complete(WorkerReport(stored=[key(4)], disk_written=[key(4)]))
    assert [(e.medium, e.lora_id, e.lora_name) for e in events.take()] == [("CPU", 3, "chat"), ("DISK", 3, "chat")]
    events.close()
    assert files.read(key(4), NS) == (key(2), [4] * CHUNK, "chat")
