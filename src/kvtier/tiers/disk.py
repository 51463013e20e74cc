"""Worker-side disk files of one directory: one entry file per (key, rank), plus a writer thread.

Layout on disk: ``root/<namespace>/<first 2 hex of key>/<32 hex key>.<rank>.kvt``, each file one entry
(``kvtier.entry``: header, then payload; with a ``Sealer`` the payload is sealed, see
``tiers/framing.py``). Writes go to a temp file in the same directory
(``<final name>.<pid>.<thread>.tmp``) and are published with ``os.replace``, so a reader sees a
whole old file, a whole new file or none. No fsync: after a power loss a published file may be
torn, which the checksums catch on read (a miss, never wrong KV). Beside an entry there may be
``<32 hex key>.tokens``, its chunk's tokens for KV events (``tiers/disk_tokens.py``), deleted with it.

``DiskFiles`` holds no mutable state and is safe from any thread. The scheduler owns the books
(which entries exist, what to evict); this module only moves bytes and reports results.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.config import NAMESPACE_RULE, is_namespace
from kvtier.crypto import Sealer
from kvtier.entry import HEADER_BYTES
from kvtier.errors import ConfigError, EntryError, UnreadableEntryError
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.disk_tokens import TOKENS_NAME, tokens_path
from kvtier.tiers.framing import check_readable, frame, stored_bytes, unframe_into
from kvtier.tiers.io_threads import unbind_this_thread

logger = logging.getLogger(__name__)

_ENTRY_NAME = re.compile(r"([0-9a-f]{32})\.(\d+)\.kvt")
_TEMP_NAME = re.compile(r"[0-9a-f]{32}\.\d+\.kvt\.[0-9a-f.]+\.tmp")  # (older versions: pid.thread)
_SUBDIR_NAME = re.compile(r"[0-9a-f]{2}")
_KEY_BYTES = 16


def namespace_dir(root: str, namespace: str) -> str:
    """``root/<namespace>``; ValueError for a name that is not a namespace (never a path)."""
    if not is_namespace(namespace):
        raise ValueError(f"namespace {namespace!r} is not {NAMESPACE_RULE}")
    return os.path.join(root, namespace)


def entry_path(root: str, key: bytes, rank: int, namespace: str) -> str:
    """The file of entry ``key`` (rank ``rank``) of ``namespace`` under the disk root ``root``."""
    if len(key) != _KEY_BYTES:
        raise ValueError(f"a storage key is {_KEY_BYTES} bytes, got {len(key)}")
    name = key.hex()
    return os.path.join(namespace_dir(root, namespace), name[:2], f"{name}.{rank}.kvt")


class DiskFiles:
    """Entry files under ``root`` for one KV layout (its fingerprint is in every header).

    With ``sealer``, payloads are encrypted at rest (AES-256-GCM, ``kvtier.crypto``) and only
    sealed entries are readable; without, they are stored in clear and only clear entries are
    readable. ``namespace`` is the tenant the entry belongs to: its directory, and (with a
    sealer) the context its encryption key is derived for. A reader must pass the writer's
    namespace, or the entry reads MISSING (another directory) or CORRUPT.
    """

    def __init__(self, root: str, layout_fingerprint: bytes, sealer: Sealer | None = None) -> None:
        """Create ``root`` if needed. Raises ``ConfigError("disk.path", ...)`` when it cannot be
        created or written."""
        self.root = root
        self.layout_fingerprint = layout_fingerprint
        self.sealer = sealer
        probe = os.path.join(root, f".kvtier-probe.{os.getpid()}.{threading.get_ident()}")
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError("disk.path", f"directory {root!r} is not creatable or writable: {exc}") from exc

    def path_for(self, key: bytes, rank: int, namespace: str) -> str:
        return entry_path(self.root, key, rank, namespace)

    def namespace_dir(self, namespace: str) -> str:
        """``root/<namespace>``; ValueError for a name that is not a namespace (never a path)."""
        return namespace_dir(self.root, namespace)

    def entry_bytes(self, payload_bytes: int) -> int:
        """Size of the file holding a payload (chunk) of ``payload_bytes`` bytes: a file of any
        other size is not a valid entry (sealing adds ``SEAL_OVERHEAD_BYTES``)."""
        return HEADER_BYTES + stored_bytes(payload_bytes, self.sealer)

    def scan(self) -> list[ScannedEntry]:
        """Every entry file, in no particular order.

        Reads no payloads (sizes come from ``stat``); other files are ignored. Removes every temp
        file, i.e. leftovers of crashed writes: call it at start-up, before this directory's
        writers start (a write racing with it fails and is reported as failed, nothing worse).
        """
        found: list[ScannedEntry] = []
        for namespace in _list_dir(self.root):
            if not namespace.is_dir(follow_symlinks=False) or not is_namespace(namespace.name):
                continue
            for subdir in _list_dir(namespace.path):
                if subdir.is_dir(follow_symlinks=False) and _SUBDIR_NAME.fullmatch(subdir.name):
                    found.extend(self._scan_subdir(subdir.path, subdir.name, namespace.name))
        return found

    def _scan_subdir(self, path: str, prefix: str, namespace: str) -> list[ScannedEntry]:
        found = []
        for item in _list_dir(path):
            if _TEMP_NAME.fullmatch(item.name):
                _unlink_quietly(item.path)
                continue
            match = _ENTRY_NAME.fullmatch(item.name)
            if match is None or not match.group(1).startswith(prefix):
                continue
            try:
                stat = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(ScannedEntry(bytes.fromhex(match.group(1)), namespace, int(match.group(2)),
                                      stat.st_size, stat.st_mtime))
        return found

    def write(self, key: bytes, rank: int, payload: bytes | memoryview, *, namespace: str) -> int:
        """Write the entry of ``(key, rank)`` (sealed when the files have a sealer) and publish it
        atomically, unless a file of that entry is there already: it is never replaced (an entry's
        content follows from its key; a file this kvtier cannot open, e.g. sealed under another
        master key, is left for its owner). Returns ``entry_bytes(len(payload))``.

        On ``OSError`` (e.g. ENOSPC) the temp file is removed and the error re-raised; an earlier
        entry of the same key, if any, is left as it was.
        """
        path = self.path_for(key, rank, namespace)
        header, stored = frame(key, rank, self.layout_fingerprint, memoryview(payload).cast("B"), self.sealer,
                               namespace, None)
        temp = f"{path}.{secrets.token_hex(8)}.tmp"  # unpredictable: nothing can be planted there
        try:
            for directory in (self.namespace_dir(namespace), os.path.dirname(path)):  # each level private
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, header)
                _write_all(fd, stored)
            finally:
                os.close(fd)
            _publish(temp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return HEADER_BYTES + stored.nbytes

    def read_into(self, key: bytes, rank: int, out: memoryview, *, namespace: str) -> ReadResult:
        """Read the payload of ``(key, rank)`` into ``out`` (exactly the expected payload size)
        and verify it (``tiers.framing.unframe_into``). Clear entries are read straight into
        ``out``; sealed ones are read into one temporary buffer (the sealed length), checksummed,
        then decrypted straight into ``out``.

        Returns OK, MISSING (no file), UNREADABLE (the file could not be opened, or is an entry
        this kvtier cannot open: sealed under another master key, does not authenticate, or of
        another encryption or compression setting; it is left in place) or CORRUPT (the file was
        wrong in any other way, or reading it failed; it has been removed where the file system
        allows). Unless OK, the content of ``out`` is unspecified; nothing outside ``out`` is
        written. Called on a reader thread, concurrently with the writer thread: ``os.replace``
        makes a concurrent write invisible until whole.
        """
        path = self.path_for(key, rank, namespace)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return ReadResult.MISSING
        except OSError as exc:  # not the entry's fault: keep it
            logger.warning("kvtier: cannot open disk entry %s: %s", path, exc)
            return ReadResult.UNREADABLE
        opened: os.stat_result | None = None
        try:
            opened = os.fstat(fd)
            self._read_checked(fd, opened.st_size, key, rank, memoryview(out).cast("B"), namespace)
            return ReadResult.OK
        except UnreadableEntryError as exc:
            logger.warning("kvtier: disk entry %s cannot be opened by this kvtier (left in place): %s", path, exc)
            return ReadResult.UNREADABLE
        except (EntryError, OSError) as exc:
            logger.warning("kvtier: bad disk entry %s: %s", path, exc)
            _unlink_if_same(path, opened)
            return ReadResult.CORRUPT
        finally:
            os.close(fd)

    def _read_checked(self, fd: int, file_bytes: int, key: bytes, rank: int, out: memoryview,
                      namespace: str) -> None:
        expected_bytes = self.entry_bytes(out.nbytes)
        if file_bytes != expected_bytes:
            header = bytearray(HEADER_BYTES)
            if file_bytes >= HEADER_BYTES and _preadv_all(fd, [memoryview(header)]) == HEADER_BYTES:
                check_readable(header, self.sealer, None)  # another setting's entry: left in place
            raise EntryError(f"entry file has {file_bytes} bytes, expected {expected_bytes}")
        header_buf = bytearray(HEADER_BYTES)
        stored = out if self.sealer is None else memoryview(bytearray(expected_bytes - HEADER_BYTES))
        num_read = _preadv_all(fd, [memoryview(header_buf), stored])
        if num_read != expected_bytes:
            raise EntryError(f"entry file truncated while reading: {num_read} of {expected_bytes} bytes")
        unframe_into(header_buf, stored, key, rank, self.layout_fingerprint, out, self.sealer, namespace, None)

    # ----- the tier contract (``kvtier.tiers.contract``) ------------------------------------
    def exists_prefix(self, keys: Sequence[bytes], rank: int, *, namespace: str, max_age_s: int = 0) -> int:
        """How many consecutive ``keys`` from the start have an entry file for ``rank`` (one
        ``stat`` each, no payload read; with ``max_age_s``, a file older than that counts as
        absent). The engine's books answer its own lookups (``TieredStore``): this is for callers
        without them (the admin service, tools)."""
        oldest = time.time() - max_age_s if max_age_s else None
        for count, key in enumerate(keys):
            try:
                found = os.stat(self.path_for(key, rank, namespace), follow_symlinks=False)
            except FileNotFoundError:
                return count
            if oldest is not None and found.st_mtime < oldest:
                return count
        return len(keys)

    def get_many_into(self, items: Sequence[tuple[bytes, memoryview]], rank: int, layout_fingerprint: bytes,
                      *, namespace: str) -> list[ReadResult]:
        """``read_into`` for each ``(key, out)``, in order. ValueError for another layout's
        fingerprint (these files hold one layout)."""
        self._check_layout(layout_fingerprint)
        return [self.read_into(key, rank, out, namespace=namespace) for key, out in items]

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]], rank: int, layout_fingerprint: bytes,
                 *, namespace: str, ttl_s: int = 0) -> list[bool]:
        """``write`` for each ``(key, payload)`` on the calling thread; False where the write
        failed (``OSError``, e.g. ENOSPC: logged). ``ttl_s`` is not kept by files: the store's
        books expire disk entries by their namespace's TTL. The engine writes through
        ``DiskWriter`` instead (off its thread, bounded)."""
        self._check_layout(layout_fingerprint)
        done = []
        for key, payload in items:
            try:
                self.write(key, rank, payload, namespace=namespace)
                done.append(True)
            except OSError as exc:
                logger.warning("kvtier: disk write of %s failed: %s", key.hex(), exc)
                done.append(False)
        return done

    def delete(self, keys: Sequence[bytes], rank: int, *, namespace: str) -> int:
        """Remove the entry files of ``keys`` for ``rank`` (rank 0: their tokens files too,
        ``tiers/disk_tokens.py``); how many entry files there were (a missing file is fine)."""
        if rank == 0:
            for key in keys:
                _unlink_quietly(tokens_path(self.root, key, namespace))
        return sum(_unlink_quietly(self.path_for(key, rank, namespace)) for key in keys)

    def _check_layout(self, layout_fingerprint: bytes) -> None:
        if layout_fingerprint != self.layout_fingerprint:
            raise ValueError(f"these disk files hold layout {self.layout_fingerprint.hex()}, "
                             f"not {layout_fingerprint.hex()}")

    def delete_namespace(self, namespace: str) -> int:
        """Remove every entry file (and temp and tokens file) of ``namespace``; returns how many entries
        went. A write racing with it may publish one file after: callers that must leave nothing
        queue a second purge behind their writes (``DiskWriter.submit_purge``)."""
        removed = 0
        top = self.namespace_dir(namespace)
        for subdir in _list_dir(top):
            if not subdir.is_dir(follow_symlinks=False):
                continue
            for item in _list_dir(subdir.path):
                if _ENTRY_NAME.fullmatch(item.name) or _TEMP_NAME.fullmatch(item.name) or \
                        TOKENS_NAME.fullmatch(item.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item.path)
                        removed += item.name.endswith(".kvt")
            with contextlib.suppress(OSError):
                os.rmdir(subdir.path)
        with contextlib.suppress(OSError):
            os.rmdir(top)
        return removed


@dataclass(frozen=True)
class ScannedEntry:
    """An entry file found by ``DiskFiles.scan``."""

    key: bytes
    namespace: str
    rank: int
    file_bytes: int
    mtime: float


@dataclass(frozen=True)
class _Op:
    key: bytes | None  # None = purge the whole namespace
    rank: int
    payload: bytes | memoryview | None  # None = delete
    namespace: str


class DiskWriter:
    """Background thread with a bounded queue that writes/deletes entries in submission order.

    ``submit_*`` and ``take_results`` are called by the worker's engine thread and never block on
    I/O. Writes are bounded by ``queue_depth`` (a full queue drops the write: the caller reports
    it failed). Deletes are never dropped: they are queued without bound, as they carry no payload
    and the store issues at most one per entry it holds. Because both go through one FIFO, a
    delete submitted after a write of the same key always wins.
    """

    def __init__(self, files: DiskFiles, queue_depth: int) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be positive, got {queue_depth}")
        self._files = files
        self._queue_depth = queue_depth
        self._ops: collections.deque[_Op] = collections.deque()
        self._num_writes_queued = 0
        self._busy = False
        self._closed = False
        self._written: list[bytes] = []
        self._failed: list[bytes] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvtier-disk-writer", daemon=True)
        self._thread.start()

    def submit_write(self, key: bytes, rank: int, payload: bytes | memoryview, *, namespace: str) -> bool:
        """Queue a write (``DiskFiles.write``, sealed on the writer thread when the files have a
        sealer); False (dropped, nothing queued) when the queue is full or closed. ``payload``
        must not change until the write is reported in ``take_results`` (a memory slot the
        store holds for it, or ``bytes``)."""
        with self._cond:
            if self._closed or self._num_writes_queued >= self._queue_depth:
                return False
            self._num_writes_queued += 1
            self._ops.append(_Op(key, rank, payload, namespace))
            self._cond.notify_all()
            return True

    def submit_delete(self, key: bytes, rank: int, *, namespace: str) -> bool:
        """Queue a delete; never dropped while open. False only after ``close()``."""
        return self._submit_removal(_Op(key, rank, None, namespace))

    def submit_purge(self, namespace: str) -> bool:
        """Queue the removal of every file of ``namespace`` (``DiskFiles.delete_namespace``);
        never dropped while open. False only after ``close()``."""
        return self._submit_removal(_Op(None, 0, None, namespace))

    def _submit_removal(self, op: _Op) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._ops.append(op)
            self._cond.notify_all()
            return True

    @property
    def num_queued_writes(self) -> int:
        """Writes queued or in progress (at most ``queue_depth``)."""
        with self._cond:
            return self._num_writes_queued

    def take_results(self) -> tuple[list[bytes], list[bytes]]:
        """(keys written, keys whose write failed) since the last call, each in completion order.
        Dropped writes are not listed: ``submit_write`` already returned False for them."""
        with self._cond:
            written, self._written = self._written, []
            failed, self._failed = self._failed, []
        return written, failed

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted operation is done; False if ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._ops and not self._busy, timeout_s)

    def close(self) -> None:
        """Stop accepting operations, finish the queued ones, and join the thread. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        unbind_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._ops or self._closed)
                if not self._ops:
                    return
                op = self._ops.popleft()
                self._busy = True
            ok = self._execute(op)
            with self._cond:
                if op.payload is not None and op.key is not None:
                    self._num_writes_queued -= 1
                    (self._written if ok else self._failed).append(op.key)
                self._busy = False
                self._cond.notify_all()

    def _execute(self, op: _Op) -> bool:
        try:
            if op.key is None:
                self._files.delete_namespace(op.namespace)
            elif op.payload is None:
                self._files.delete([op.key], op.rank, namespace=op.namespace)
            else:
                self._files.write(op.key, op.rank, op.payload, namespace=op.namespace)
            return True
        except OSError as exc:
            what = "purge" if op.key is None else "delete" if op.payload is None else "write"
            logger.warning("kvtier: disk %s of %s failed: %s", what, op.namespace if op.key is None else op.key.hex(),
                           exc)
        except Exception:  # a bug must not kill the writer thread and hang flush()/close()
            logger.exception("kvtier: unexpected error in the disk writer")
        return False


def _publish(temp: str, path: str) -> None:
    """Make the complete file ``temp`` visible at ``path`` in one step, unless ``path`` exists
    (then nothing changes); the caller removes ``temp`` after."""
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if not os.path.exists(path):  # a file system without hard links
            os.replace(temp, path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(fd, view):]


def _preadv_all(fd: int, buffers: list[memoryview]) -> int:
    """Fill ``buffers`` from offset 0 of ``fd`` with ``os.preadv``; returns bytes read (short
    only at end of file)."""
    total = 0
    pending = [buf for buf in buffers if buf.nbytes]
    while pending:
        num_read = os.preadv(fd, pending, total)
        if num_read == 0:
            break
        total += num_read
        while pending and num_read >= pending[0].nbytes:
            num_read -= pending.pop(0).nbytes
        if pending and num_read:
            pending[0] = pending[0][num_read:]
    return total


def _list_dir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _unlink_if_same(path: str, opened: os.stat_result | None) -> None:
    """Remove ``path`` unless it now names a different file than the one we read (a writer
    replaced it meanwhile): never delete a fresh good entry because an old one was bad."""
    with contextlib.suppress(OSError):
        current = os.stat(path)
        if opened is None or (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            os.unlink(path)
