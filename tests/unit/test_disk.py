"""Disk entry files and the background writer, on a real file system."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from kvtier.crypto import SEAL_OVERHEAD_BYTES, Sealer
from kvtier.entry import CODEC_AES256_GCM, CODEC_RAW, HEADER_BYTES, EntryHeader, decode_header, encode_header, \
    payload_checksum
from kvtier.errors import ConfigError
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.disk import DiskFiles, DiskWriter

LAYOUT = bytes(range(16))
TENANT = "tenant-a"
PAYLOAD = bytes(range(256)) * 16  # 4 KiB


def key_of(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def files(tmp_path) -> DiskFiles:
    return DiskFiles(str(tmp_path / "disk"), LAYOUT)


def read(files: DiskFiles, key: bytes, rank: int = 0, num_bytes: int = len(PAYLOAD)) -> tuple[ReadResult, bytes]:
    out = bytearray(num_bytes)
    return files.read_into(key, rank, memoryview(out), namespace=TENANT), bytes(out)


def test_round_trip(files: DiskFiles) -> None:
    key = key_of(1)
    assert files.write(key, 2, PAYLOAD, namespace=TENANT) == files.entry_bytes(len(PAYLOAD)) == HEADER_BYTES + len(PAYLOAD)
    path = files.path_for(key, 2, TENANT)
    assert path == os.path.join(files.root, TENANT, key.hex()[:2], f"{key.hex()}.2.kvt")
    assert os.path.getsize(path) == HEADER_BYTES + len(PAYLOAD)
    assert read(files, key, rank=2) == (ReadResult.OK, PAYLOAD)
    assert read(files, key, rank=0)[0] is ReadResult.MISSING  # other rank
    assert read(files, key_of(2), rank=2)[0] is ReadResult.MISSING


def test_an_entry_is_never_replaced_and_delete_is_idempotent(files: DiskFiles) -> None:
    # an entry's content follows from its key; a file there (perhaps of another master key) stays
    key = key_of(1)
    files.write(key, 0, PAYLOAD, namespace=TENANT)
    files.write(key, 0, PAYLOAD[::-1], namespace=TENANT)
    assert read(files, key) == (ReadResult.OK, PAYLOAD)
    assert not [name for name in os.listdir(os.path.dirname(files.path_for(key, 0, TENANT))) if ".tmp" in name]
    assert files.delete([key], 0, namespace=TENANT) == 1
    assert files.delete([key], 0, namespace=TENANT) == 0
    assert read(files, key)[0] is ReadResult.MISSING


def test_a_prefix_lookup_with_a_max_age_ignores_older_files(files: DiskFiles) -> None:
    keys = [key_of(i) for i in range(3)]
    assert files.put_many([(key, PAYLOAD) for key in keys], 0, LAYOUT, namespace=TENANT) == [True] * 3
    an_hour_ago = os.stat(files.path_for(keys[1], 0, TENANT)).st_mtime - 3600
    os.utime(files.path_for(keys[1], 0, TENANT), (an_hour_ago, an_hour_ago))
    assert files.exists_prefix(keys, 0, namespace=TENANT) == 3  # no TTL: every file counts
    assert files.exists_prefix(keys, 0, namespace=TENANT, max_age_s=600) == 1  # the old one ends the prefix


def test_calls_naming_another_layout_are_refused(files: DiskFiles) -> None:
    other = bytes(range(1, 17))
    with pytest.raises(ValueError, match="layout"):
        files.put_many([(key_of(1), PAYLOAD)], 0, other, namespace=TENANT)
    with pytest.raises(ValueError, match="layout"):
        files.get_many_into([(key_of(1), memoryview(bytearray(len(PAYLOAD))))], 0, other, namespace=TENANT)
    assert files.exists_prefix([key_of(1)], 0, namespace=TENANT) == 0  # nothing was written


def test_restart_scans_entries_and_cleans_crash_leftovers(tmp_path) -> None:
    root = str(tmp_path / "disk")
    first = DiskFiles(root, LAYOUT)
    first.write(key_of(1), 0, PAYLOAD, namespace=TENANT)
    first.write(key_of(1), 1, PAYLOAD, namespace=TENANT)
    first.write(key_of(2), 0, PAYLOAD[:100], namespace=TENANT)
    # A crash mid-write leaves a temp file; foreign files must be left alone.
    temp = first.path_for(key_of(3), 0, TENANT) + ".4242.139872.tmp"
    os.makedirs(os.path.dirname(temp), exist_ok=True)
    with open(temp, "wb") as f:
        f.write(b"half an entry")
    foreign = [os.path.join(root, "README"), os.path.join(root, "zz", "notes.kvt"),
               os.path.join(os.path.dirname(temp), "other.tmp")]
    for path in foreign:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()

    # Step: a new process opens the same directory and rebuilds its index from the files.
    entries = DiskFiles(root, LAYOUT).scan()
    found = sorted((e.key, e.rank, e.file_bytes) for e in entries)
    assert found == [(key_of(1), 0, HEADER_BYTES + len(PAYLOAD)), (key_of(1), 1, HEADER_BYTES + len(PAYLOAD)),
                     (key_of(2), 0, HEADER_BYTES + 100)]
    assert all(isinstance(e.mtime, float) and e.namespace == TENANT for e in entries)
    assert not os.path.exists(temp)
    assert all(os.path.exists(path) for path in foreign)


def test_scan_of_empty_dir(files: DiskFiles) -> None:
    assert files.scan() == []


@pytest.mark.parametrize("offset", [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1000,
                                    HEADER_BYTES + len(PAYLOAD) - 1])
def test_corrupt_byte_is_detected_and_removed(files: DiskFiles, offset: int) -> None:
    key = key_of(7)
    files.write(key, 0, PAYLOAD, namespace=TENANT)
    path = files.path_for(key, 0, TENANT)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    assert read(files, key)[0] is ReadResult.CORRUPT
    assert not os.path.exists(path)
    assert read(files, key)[0] is ReadResult.MISSING


@pytest.mark.parametrize("length", [0, 5, HEADER_BYTES, HEADER_BYTES + 1, HEADER_BYTES + len(PAYLOAD) - 1])
def test_truncated_file_is_corrupt(files: DiskFiles, length: int) -> None:
    key = key_of(8)
    files.write(key, 0, PAYLOAD, namespace=TENANT)
    os.truncate(files.path_for(key, 0, TENANT), length)
    assert read(files, key)[0] is ReadResult.CORRUPT
    assert not os.path.exists(files.path_for(key, 0, TENANT))


def test_trailing_bytes_are_corrupt(files: DiskFiles) -> None:
    key = key_of(8)
    files.write(key, 0, PAYLOAD, namespace=TENANT)
    with open(files.path_for(key, 0, TENANT), "ab") as f:
        f.write(b"x")
    assert read(files, key)[0] is ReadResult.CORRUPT


def test_wrong_layout_fingerprint_is_corrupt(tmp_path) -> None:
    root = str(tmp_path / "disk")
    DiskFiles(root, LAYOUT).write(key_of(1), 0, PAYLOAD, namespace=TENANT)
    other = DiskFiles(root, bytes(16))
    assert read(other, key_of(1))[0] is ReadResult.CORRUPT
    assert not os.path.exists(other.path_for(key_of(1), 0, TENANT))


def test_entry_under_another_name_is_corrupt(files: DiskFiles) -> None:
    files.write(key_of(1), 0, PAYLOAD, namespace=TENANT)
    os.makedirs(os.path.dirname(files.path_for(key_of(2), 0, TENANT)), exist_ok=True)
    shutil.copy(files.path_for(key_of(1), 0, TENANT), files.path_for(key_of(2), 0, TENANT))
    shutil.copy(files.path_for(key_of(1), 0, TENANT), files.path_for(key_of(1), 1, TENANT))
    assert read(files, key_of(2))[0] is ReadResult.CORRUPT  # key mismatch
    assert read(files, key_of(1), rank=1)[0] is ReadResult.CORRUPT  # rank mismatch
    assert read(files, key_of(1), num_bytes=len(PAYLOAD) - 1)[0] is ReadResult.CORRUPT  # wrong size


def test_read_into_writes_into_the_callers_buffer(files: DiskFiles) -> None:
    files.write(key_of(1), 0, memoryview(PAYLOAD), namespace=TENANT)
    pool = bytearray(3 * len(PAYLOAD))
    slot = memoryview(pool)[len(PAYLOAD):2 * len(PAYLOAD)]
    assert files.read_into(key_of(1), 0, slot, namespace=TENANT) is ReadResult.OK
    assert pool == bytes(len(PAYLOAD)) + PAYLOAD + bytes(len(PAYLOAD))


def test_uncreatable_root_is_a_config_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="disk.path"):
        DiskFiles(str(blocker / "disk"), LAYOUT)


def test_write_error_removes_temp_and_keeps_old_entry(files: DiskFiles, monkeypatch) -> None:
    key = key_of(1)
    files.write(key, 0, PAYLOAD, namespace=TENANT)
    calls = []

    def fail_on_payload(fd: int, data) -> int:
        calls.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", fail_on_payload)
    with pytest.raises(OSError) as info:
        files.write(key, 0, PAYLOAD[::-1], namespace=TENANT)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and calls
    assert os.listdir(os.path.dirname(files.path_for(key, 0, TENANT))) == [os.path.basename(files.path_for(key, 0, TENANT))]
    assert read(files, key) == (ReadResult.OK, PAYLOAD)


@pytest.fixture
def tiny_fs(tmp_path) -> Iterator[str]:
    """A real 256 KiB tmpfs, where the kernel allows this process to mount one; else skipped."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_on_a_real_file_system(tiny_fs: str) -> None:
    files = DiskFiles(os.path.join(tiny_fs, "disk"), LAYOUT)
    payload = bytes(60 * 1024)
    written = []
    with pytest.raises(OSError) as info:
        for i in range(10):
            files.write(key_of(i), 0, payload, namespace=TENANT)
            written.append(key_of(i))
    assert info.value.errno == errno.ENOSPC
    assert written, "at least one entry fits"
    leftovers = [name for _, _, names in os.walk(files.root) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    assert sorted(e.key for e in files.scan()) == written
    assert all(read(files, key, num_bytes=len(payload))[0] is ReadResult.OK for key in written)


# ----- encryption at rest --------------------------------------------------------------------

SECRET = os.urandom(4096)  # random: a run of it in a file can only come from the plaintext
SEALER = Sealer(bytes(range(32)))


@pytest.fixture
def sealed(tmp_path) -> DiskFiles:
    return DiskFiles(str(tmp_path / "disk"), LAYOUT, sealer=SEALER)


def read_secret(files: DiskFiles, key: bytes, rank: int = 0, namespace: str = TENANT) -> tuple[ReadResult, bytes]:
    out = bytearray(len(SECRET))
    return files.read_into(key, rank, memoryview(out), namespace=namespace), bytes(out)


def forge(source: str, dest: str, key: bytes | None = None, rank: int | None = None, layout: bytes | None = None,
          codec: int | None = None, stored: bytes | None = None) -> None:
    """Write at ``dest`` the entry at ``source`` with header fields replaced and every checksum
    recomputed, as an attacker with write access to the directory can (xxh3 is no secret)."""
    with open(source, "rb") as f:
        data = f.read()
    old = decode_header(data)
    stored = data[HEADER_BYTES:] if stored is None else stored
    header = EntryHeader(key or old.key, old.rank if rank is None else rank, layout or old.layout_fingerprint,
                         old.codec if codec is None else codec, len(stored), payload_checksum(stored))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "wb") as f:
        f.write(encode_header(header) + stored)


def test_encrypted_round_trip_leaves_no_plaintext_on_disk(sealed: DiskFiles) -> None:
    key = key_of(1)
    written = sealed.write(key, 0, SECRET, namespace=TENANT)
    assert written == sealed.entry_bytes(len(SECRET)) == HEADER_BYTES + len(SECRET) + SEAL_OVERHEAD_BYTES
    with open(sealed.path_for(key, 0, TENANT), "rb") as f:
        data = f.read()
    assert len(data) == written and decode_header(data).codec == CODEC_AES256_GCM
    assert not any(SECRET[i:i + 16] in data for i in range(len(SECRET) - 16))
    assert read_secret(sealed, key) == (ReadResult.OK, SECRET)
    # scan() reports the sealed size: start-up must compare it with entry_bytes(), not HEADER_BYTES + chunk.
    assert [(e.key, e.rank, e.file_bytes) for e in sealed.scan()] == [(key, 0, written)]


def test_encrypted_read_writes_only_the_callers_slot(sealed: DiskFiles) -> None:
    sealed.write(key_of(1), 0, SECRET, namespace=TENANT)
    pool = bytearray(b"\x5a" * (3 * len(SECRET)))
    slot = memoryview(pool)[len(SECRET):2 * len(SECRET)]
    assert sealed.read_into(key_of(1), 0, slot, namespace=TENANT) is ReadResult.OK
    assert pool == b"\x5a" * len(SECRET) + SECRET + b"\x5a" * len(SECRET)


@pytest.mark.parametrize("offset", [10, HEADER_BYTES, HEADER_BYTES + 20, HEADER_BYTES + 28 + 100, -1],
                         ids=["header", "salt", "nonce", "ciphertext", "tag"])
def test_tampered_encrypted_entry_is_corrupt(sealed: DiskFiles, offset: int, caplog) -> None:
    key = key_of(7)
    sealed.write(key, 0, SECRET, namespace=TENANT)
    path = sealed.path_for(key, 0, TENANT)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0x04
    with open(path, "wb") as f:
        f.write(data)
    assert read_secret(sealed, key)[0] is ReadResult.CORRUPT
    assert not os.path.exists(path)
    if offset == 10:
        return
    # Step: the same damage with both checksums recomputed (xxh3 is no secret): the tag still refuses
    # it. Tampering and another master key look alike here, so the entry is a miss left in place.
    sealed.write(key, 0, SECRET, namespace=TENANT)
    forge(path, path, stored=bytes(data[HEADER_BYTES:]))
    caplog.clear()
    assert read_secret(sealed, key)[0] is ReadResult.UNREADABLE
    assert os.path.exists(path)
    assert "does not authenticate" in caplog.text


def test_swapped_encrypted_entries_are_corrupt(sealed: DiskFiles, caplog) -> None:
    # Each file keeps its own header (key, checksums forged) but carries the other key's sealed payload.
    one, two = key_of(1), key_of(2)
    sealed.write(one, 0, SECRET, namespace=TENANT)
    sealed.write(two, 0, SECRET[::-1], namespace=TENANT)
    paths = {key: sealed.path_for(key, 0, TENANT) for key in (one, two)}
    stored = {}
    for key, path in paths.items():
        with open(path, "rb") as f:
            stored[key] = f.read()[HEADER_BYTES:]
    forge(paths[one], paths[one], stored=stored[two])
    forge(paths[two], paths[two], stored=stored[one])
    assert read_secret(sealed, one)[0] is ReadResult.UNREADABLE
    assert read_secret(sealed, two)[0] is ReadResult.UNREADABLE
    assert caplog.text.count("does not authenticate") == 2  # the tag refused them, not a header check


@pytest.mark.parametrize("replay", ["another key", "another rank", "another layout"])
def test_encrypted_entry_replayed_under_another_identity_is_corrupt(tmp_path, sealed: DiskFiles, replay: str,
                                                                    caplog) -> None:
    sealed.write(key_of(1), 0, SECRET, namespace=TENANT)
    source = sealed.path_for(key_of(1), 0, TENANT)
    if replay == "another key":
        forge(source, sealed.path_for(key_of(2), 0, TENANT), key=key_of(2))
        assert read_secret(sealed, key_of(2))[0] is ReadResult.UNREADABLE
    elif replay == "another rank":
        forge(source, sealed.path_for(key_of(1), 1, TENANT), rank=1)
        assert read_secret(sealed, key_of(1), rank=1)[0] is ReadResult.UNREADABLE
    else:
        other = DiskFiles(str(tmp_path / "other"), bytes(16), sealer=SEALER)
        forge(source, other.path_for(key_of(1), 0, TENANT), layout=bytes(16))
        assert read_secret(other, key_of(1))[0] is ReadResult.UNREADABLE
    assert "does not authenticate" in caplog.text
    assert read_secret(sealed, key_of(1)) == (ReadResult.OK, SECRET)  # the original is untouched


def test_clear_entry_is_refused_when_encryption_is_on(sealed: DiskFiles, caplog) -> None:
    # A clear entry of the right file size needs no key to forge: with encryption on it must not load.
    sealed.write(key_of(1), 0, SECRET, namespace=TENANT)
    path = sealed.path_for(key_of(1), 0, TENANT)
    forge(path, path, codec=CODEC_RAW, stored=os.urandom(len(SECRET) + SEAL_OVERHEAD_BYTES))
    assert read_secret(sealed, key_of(1))[0] is ReadResult.UNREADABLE
    assert "entry is in clear, this kvtier has encryption on" in caplog.text
    # And a reader without encryption cannot read a sealed entry: a miss, left for the readers
    # with the key (its size is a sealed chunk's, not a clear one's: the header is checked first).
    sealed.write(key_of(2), 0, SECRET, namespace=TENANT)
    clear = DiskFiles(sealed.root, LAYOUT)
    for num_bytes in (len(SECRET), len(SECRET) + SEAL_OVERHEAD_BYTES):
        out = bytearray(num_bytes)
        assert clear.read_into(key_of(2), 0, memoryview(out), namespace=TENANT) is ReadResult.UNREADABLE
    assert read_secret(sealed, key_of(2)) == (ReadResult.OK, SECRET)


def test_other_namespace_or_master_key_is_corrupt(sealed: DiskFiles) -> None:
    sealed.write(key_of(1), 0, SECRET, namespace=TENANT)
    assert read_secret(sealed, key_of(1), namespace="tenant-b")[0] is ReadResult.MISSING  # another directory
    moved = sealed.path_for(key_of(1), 0, "tenant-b")
    os.makedirs(os.path.dirname(moved))
    shutil.copy(sealed.path_for(key_of(1), 0, TENANT), moved)  # planted in another tenant's directory
    assert read_secret(sealed, key_of(1), namespace="tenant-b")[0] is ReadResult.UNREADABLE
    other_master = DiskFiles(sealed.root, LAYOUT, sealer=Sealer(bytes(range(1, 33))))
    assert read_secret(other_master, key_of(1))[0] is ReadResult.UNREADABLE
    # a wrong master key leaves every entry for the right one
    assert read_secret(sealed, key_of(1)) == (ReadResult.OK, SECRET)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs"])
def test_a_namespace_is_never_a_path(files: DiskFiles, name: str) -> None:
    with pytest.raises(ValueError):
        files.path_for(key_of(1), 0, name)
    with pytest.raises(ValueError):
        files.write(key_of(1), 0, PAYLOAD, namespace=name)


def test_delete_namespace_removes_its_files_and_only_its_files(files: DiskFiles) -> None:
    files.write(key_of(1), 0, PAYLOAD, namespace="a")
    files.write(key_of(2), 1, PAYLOAD, namespace="a")
    files.write(key_of(3), 0, PAYLOAD, namespace="b")
    assert files.delete_namespace("a") == 2
    assert [(e.key, e.namespace) for e in files.scan()] == [(key_of(3), "b")]
    assert not os.path.exists(os.path.join(files.root, "a"))
    assert files.delete_namespace("nobody") == 0


def test_writer_purge_runs_after_the_writes_queued_before_it(files: DiskFiles) -> None:
    writer = DiskWriter(files, queue_depth=8)
    for i in range(5):
        assert writer.submit_write(key_of(i), 0, PAYLOAD, namespace="a")
    assert writer.submit_purge("a")
    assert writer.flush(10)
    writer.close()
    assert files.scan() == []


def test_writer_seals_on_its_thread(sealed: DiskFiles) -> None:
    writer = DiskWriter(sealed, queue_depth=2)
    try:
        assert writer.submit_write(key_of(1), 0, SECRET, namespace=TENANT)
        assert writer.flush(5)
        assert writer.take_results() == ([key_of(1)], [])
    finally:
        writer.close()
    assert read_secret(sealed, key_of(1)) == (ReadResult.OK, SECRET)
    assert os.path.getsize(sealed.path_for(key_of(1), 0, TENANT)) == sealed.entry_bytes(len(SECRET))


# ----- DiskWriter ----------------------------------------------------------------------------


@pytest.fixture
def writer(files: DiskFiles) -> Iterator[DiskWriter]:
    writer = DiskWriter(files, queue_depth=2)
    yield writer
    writer.close()


def hold_writes(monkeypatch, files: DiskFiles) -> threading.Event:
    """Make every write wait until the returned event is set."""
    release = threading.Event()
    real_write = files.write

    def held_write(key: bytes, rank: int, payload: bytes, *, namespace: str) -> int:
        release.wait(10)
        return real_write(key, rank, payload, namespace=namespace)

    monkeypatch.setattr(files, "write", held_write)
    return release


def test_writer_writes_and_reports(files: DiskFiles, writer: DiskWriter) -> None:
    assert writer.submit_write(key_of(1), 0, PAYLOAD, namespace=TENANT)
    assert writer.flush(5)
    assert writer.take_results() == ([key_of(1)], [])
    assert writer.take_results() == ([], [])
    assert read(files, key_of(1)) == (ReadResult.OK, PAYLOAD)


def test_writer_drops_when_full_but_never_drops_deletes(files, writer, monkeypatch) -> None:
    release = hold_writes(monkeypatch, files)
    # Step: the first write is in flight (held), the second waits: the queue of depth 2 is full.
    assert writer.submit_write(key_of(1), 0, PAYLOAD, namespace=TENANT)
    assert writer.submit_write(key_of(2), 0, PAYLOAD, namespace=TENANT)
    assert not writer.submit_write(key_of(3), 0, PAYLOAD, namespace=TENANT)
    # Step: deletes are still accepted, and run after the writes submitted before them.
    assert writer.submit_delete(key_of(1), 0, namespace=TENANT)
    assert not writer.flush(0.05)
    release.set()
    assert writer.flush(5)
    assert writer.take_results() == ([key_of(1), key_of(2)], [])
    assert read(files, key_of(1))[0] is ReadResult.MISSING  # written, then deleted
    assert read(files, key_of(2))[0] is ReadResult.OK
    assert read(files, key_of(3))[0] is ReadResult.MISSING
    # Step: with the queue drained, writes are accepted again.
    assert writer.submit_write(key_of(3), 0, PAYLOAD, namespace=TENANT)


def test_writer_reports_failed_writes(files, writer, monkeypatch) -> None:
    def no_space(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    assert writer.submit_write(key_of(1), 0, PAYLOAD, namespace=TENANT)
    assert writer.flush(5)
    monkeypatch.undo()
    assert writer.take_results() == ([], [key_of(1)])
    assert files.scan() == []
    assert writer.submit_write(key_of(2), 0, PAYLOAD, namespace=TENANT) and writer.flush(5)
    assert writer.take_results() == ([key_of(2)], [])


def test_close_finishes_queued_work_then_refuses(files: DiskFiles) -> None:
    writer = DiskWriter(files, queue_depth=8)
    for i in range(5):
        assert writer.submit_write(key_of(i), 0, PAYLOAD, namespace=TENANT)
    writer.close()
    assert len(files.scan()) == 5
    assert writer.take_results()[0] == [key_of(i) for i in range(5)]
    assert not writer.submit_write(key_of(9), 0, PAYLOAD, namespace=TENANT)
    assert not writer.submit_delete(key_of(0), 0, namespace=TENANT)
    writer.close()


def test_an_entry_that_cannot_be_opened_is_a_miss_left_in_place(tmp_path, monkeypatch) -> None:
    # out of file descriptors used to delete good entries
    import errno

    files = DiskFiles(str(tmp_path / "disk"), LAYOUT)
    files.write(key_of(1), 0, SECRET, namespace=TENANT)
    real_open = os.open

    def no_descriptors(path, flags, *args):
        if str(path).endswith(".kvt"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_descriptors)
    out = bytearray(len(SECRET))
    assert files.read_into(key_of(1), 0, memoryview(out), namespace=TENANT) is ReadResult.UNREADABLE
    monkeypatch.setattr(os, "open", real_open)
    assert files.read_into(key_of(1), 0, memoryview(out), namespace=TENANT) is ReadResult.OK and bytes(out) == SECRET


def test_entries_and_directories_are_private(tmp_path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        files = DiskFiles(str(tmp_path / "disk"), LAYOUT)
        files.write(key_of(1), 0, SECRET, namespace=TENANT)
    finally:
        os.umask(old)
    path = files.path_for(key_of(1), 0, TENANT)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for directory in (os.path.dirname(path), files.namespace_dir(TENANT), files.root):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
