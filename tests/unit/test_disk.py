"""Disk entry files and the background writer, on a real file system."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from kvtier.entry import HEADER_BYTES
from kvtier.errors import ConfigError
from kvtier.tiers.disk import DiskFiles, DiskWriter, ReadResult

LAYOUT = bytes(range(16))
PAYLOAD = bytes(range(256)) * 16  # 4 KiB


def key_of(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def files(tmp_path) -> DiskFiles:
    return DiskFiles(str(tmp_path / "disk"), LAYOUT)


def read(files: DiskFiles, key: bytes, rank: int = 0, num_bytes: int = len(PAYLOAD)) -> tuple[ReadResult, bytes]:
    out = bytearray(num_bytes)
    return files.read_into(key, rank, memoryview(out)), bytes(out)


def test_round_trip(files: DiskFiles) -> None:
    key = key_of(1)
    assert files.write(key, 2, PAYLOAD) == files.entry_bytes(len(PAYLOAD)) == HEADER_BYTES + len(PAYLOAD)
    path = files.path_for(key, 2)
    assert path == os.path.join(files.root, key.hex()[:2], f"{key.hex()}.2.kvt")
    assert os.path.getsize(path) == HEADER_BYTES + len(PAYLOAD)
    assert read(files, key, rank=2) == (ReadResult.OK, PAYLOAD)
    assert read(files, key, rank=0)[0] is ReadResult.MISSING  # other rank
    assert read(files, key_of(2), rank=2)[0] is ReadResult.MISSING


def test_rewrite_replaces_and_delete_is_idempotent(files: DiskFiles) -> None:
    key = key_of(1)
    files.write(key, 0, PAYLOAD)
    files.write(key, 0, PAYLOAD[::-1])
    assert read(files, key) == (ReadResult.OK, PAYLOAD[::-1])
    files.delete(key, 0)
    files.delete(key, 0)
    assert read(files, key)[0] is ReadResult.MISSING


def test_restart_scans_entries_and_cleans_crash_leftovers(tmp_path) -> None:
    root = str(tmp_path / "disk")
    first = DiskFiles(root, LAYOUT)
    first.write(key_of(1), 0, PAYLOAD)
    first.write(key_of(1), 1, PAYLOAD)
    first.write(key_of(2), 0, PAYLOAD[:100])
    # A crash mid-write leaves a temp file; foreign files must be left alone.
    temp = first.path_for(key_of(3), 0) + ".4242.139872.tmp"
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
    found = sorted((key, rank, size) for key, rank, size, _ in entries)
    assert found == [(key_of(1), 0, HEADER_BYTES + len(PAYLOAD)), (key_of(1), 1, HEADER_BYTES + len(PAYLOAD)),
                     (key_of(2), 0, HEADER_BYTES + 100)]
    assert all(isinstance(mtime, float) for *_, mtime in entries)
    assert not os.path.exists(temp)
    assert all(os.path.exists(path) for path in foreign)


def test_scan_of_empty_dir(files: DiskFiles) -> None:
    assert files.scan() == []


@pytest.mark.parametrize("offset", [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1000,
                                    HEADER_BYTES + len(PAYLOAD) - 1])
def test_corrupt_byte_is_detected_and_removed(files: DiskFiles, offset: int) -> None:
    key = key_of(7)
    files.write(key, 0, PAYLOAD)
    path = files.path_for(key, 0)
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
    files.write(key, 0, PAYLOAD)
    os.truncate(files.path_for(key, 0), length)
    assert read(files, key)[0] is ReadResult.CORRUPT
    assert not os.path.exists(files.path_for(key, 0))


def test_trailing_bytes_are_corrupt(files: DiskFiles) -> None:
    key = key_of(8)
    files.write(key, 0, PAYLOAD)
    with open(files.path_for(key, 0), "ab") as f:
        f.write(b"x")
    assert read(files, key)[0] is ReadResult.CORRUPT


def test_wrong_layout_fingerprint_is_corrupt(tmp_path) -> None:
    root = str(tmp_path / "disk")
    DiskFiles(root, LAYOUT).write(key_of(1), 0, PAYLOAD)
    other = DiskFiles(root, bytes(16))
    assert read(other, key_of(1))[0] is ReadResult.CORRUPT
    assert not os.path.exists(other.path_for(key_of(1), 0))


def test_entry_under_another_name_is_corrupt(files: DiskFiles) -> None:
    files.write(key_of(1), 0, PAYLOAD)
    os.makedirs(os.path.dirname(files.path_for(key_of(2), 0)), exist_ok=True)
    shutil.copy(files.path_for(key_of(1), 0), files.path_for(key_of(2), 0))
    shutil.copy(files.path_for(key_of(1), 0), files.path_for(key_of(1), 1))
    assert read(files, key_of(2))[0] is ReadResult.CORRUPT  # key mismatch
    assert read(files, key_of(1), rank=1)[0] is ReadResult.CORRUPT  # rank mismatch
    assert read(files, key_of(1), num_bytes=len(PAYLOAD) - 1)[0] is ReadResult.CORRUPT  # wrong size


def test_read_into_writes_into_the_callers_buffer(files: DiskFiles) -> None:
    files.write(key_of(1), 0, memoryview(PAYLOAD))
    pool = bytearray(3 * len(PAYLOAD))
    slot = memoryview(pool)[len(PAYLOAD):2 * len(PAYLOAD)]
    assert files.read_into(key_of(1), 0, slot) is ReadResult.OK
    assert pool == bytes(len(PAYLOAD)) + PAYLOAD + bytes(len(PAYLOAD))


def test_uncreatable_root_is_a_config_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="disk.path"):
        DiskFiles(str(blocker / "disk"), LAYOUT)


def test_write_error_removes_temp_and_keeps_old_entry(files: DiskFiles, monkeypatch) -> None:
    key = key_of(1)
    files.write(key, 0, PAYLOAD)
    calls = []

    def fail_on_payload(fd: int, data) -> int:
        calls.append(len(data))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", fail_on_payload)
    with pytest.raises(OSError) as info:
        files.write(key, 0, PAYLOAD[::-1])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and calls
    assert os.listdir(os.path.dirname(files.path_for(key, 0))) == [os.path.basename(files.path_for(key, 0))]
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
            files.write(key_of(i), 0, payload)
            written.append(key_of(i))
    assert info.value.errno == errno.ENOSPC
    assert written, "at least one entry fits"
    leftovers = [name for _, _, names in os.walk(files.root) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    assert sorted(key for key, *_ in files.scan()) == written
    assert all(read(files, key, num_bytes=len(payload))[0] is ReadResult.OK for key in written)


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

    def held_write(key: bytes, rank: int, payload: bytes, codec: int = 0) -> int:
        release.wait(10)
        return real_write(key, rank, payload, codec)

    monkeypatch.setattr(files, "write", held_write)
    return release


def test_writer_writes_and_reports(files: DiskFiles, writer: DiskWriter) -> None:
    assert writer.submit_write(key_of(1), 0, PAYLOAD)
    assert writer.flush(5)
    assert writer.take_results() == ([key_of(1)], [])
    assert writer.take_results() == ([], [])
    assert read(files, key_of(1)) == (ReadResult.OK, PAYLOAD)


def test_writer_drops_when_full_but_never_drops_deletes(files, writer, monkeypatch) -> None:
    release = hold_writes(monkeypatch, files)
    # Step: the first write is in flight (held), the second waits: the queue of depth 2 is full.
    assert writer.submit_write(key_of(1), 0, PAYLOAD)
    assert writer.submit_write(key_of(2), 0, PAYLOAD)
    assert not writer.submit_write(key_of(3), 0, PAYLOAD)
    # Step: deletes are still accepted, and run after the writes submitted before them.
    assert writer.submit_delete(key_of(1), 0)
    assert not writer.flush(0.05)
    release.set()
    assert writer.flush(5)
    assert writer.take_results() == ([key_of(1), key_of(2)], [])
    assert read(files, key_of(1))[0] is ReadResult.MISSING  # written, then deleted
    assert read(files, key_of(2))[0] is ReadResult.OK
    assert read(files, key_of(3))[0] is ReadResult.MISSING
    # Step: with the queue drained, writes are accepted again.
    assert writer.submit_write(key_of(3), 0, PAYLOAD)


def test_writer_reports_failed_writes(files, writer, monkeypatch) -> None:
    def no_space(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    assert writer.submit_write(key_of(1), 0, PAYLOAD)
    assert writer.flush(5)
    monkeypatch.undo()
    assert writer.take_results() == ([], [key_of(1)])
    assert files.scan() == []
    assert writer.submit_write(key_of(2), 0, PAYLOAD) and writer.flush(5)
    assert writer.take_results() == ([key_of(2)], [])


def test_close_finishes_queued_work_then_refuses(files: DiskFiles) -> None:
    writer = DiskWriter(files, queue_depth=8)
    for i in range(5):
        assert writer.submit_write(key_of(i), 0, PAYLOAD)
    writer.close()
    assert len(files.scan()) == 5
    assert writer.take_results()[0] == [key_of(i) for i in range(5)]
    assert not writer.submit_write(key_of(9), 0, PAYLOAD)
    assert not writer.submit_delete(key_of(0), 0)
    writer.close()
