"""The tokens of disk entries, so that an engine that restarts on a full disk tier can announce it.

Routers rebuild prefix chains from the tokens in KV events (``BlockStored``); a disk entry holds a
chunk's KV, not its tokens. When KV events are on, the scheduler writes beside each disk entry a
small file with the chunk's parent key and tokens,
``root/<namespace>/<first 2 hex of key>/<32 hex key>.tokens`` (4 bytes a token: 1 KiB for a
256-token chunk, against megabytes of KV), and at start-up announces every entry whose file
reads back. The file goes where its entry goes: ``DiskFiles.delete`` of rank 0's file removes it,
``DiskFiles.delete_namespace`` removes it, and ``remove_orphans`` (at start-up) removes one whose
entry is gone. With encryption at rest it is sealed like the entry (AES-256-GCM under the
namespace's key; the tokens are the prompt's text). A missing, short, altered or unauthentic file
only means that its entry is not announced.

Format (clear, before sealing): ``b"KVTT"``, version 2, a flag byte (1: has a parent, 2: has a
LoRA adapter), the parent key (16 bytes, zeros without one), the token count (uint32), the tokens
(uint32 each), then with flag 2 the adapter's name (uint16 length, UTF-8), all little-endian
(version 1 files, written before adapters were kept, read as absent: their chunks might be an
adapter's, announced as the base model's). Writes go straight to
the final name (no temp file: a torn write fails the length check), created ``0600`` and never
through a symbolic link.
"""

from __future__ import annotations

import array
import logging
import os
import queue
import re
import stat
import struct
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from kvtier.config import is_namespace
from kvtier.tiers.io_threads import unbind_this_thread

if TYPE_CHECKING:  # the connector imports this module: cryptography only where a sealer is made
    from kvtier.crypto import Sealer

logger = logging.getLogger("kvtier")

_MAGIC = b"KVTT"
_VERSION = 2
_HAS_PARENT, _HAS_LORA = 1, 2
_HEAD = struct.Struct("<4sBB16sI")
_NAME_LENGTH = struct.Struct("<H")
_KEY_BYTES = 16
_SUFFIX = ".tokens"
TOKENS_NAME = re.compile(r"([0-9a-f]{32})\.tokens")
_AAD = b"kvtier-chunk-tokens-v1"
_MAX_FILE_BYTES = 64 << 20  # far above any chunk's tokens: a larger file is not ours
_QUEUE_LIMIT = 65_536  # chunks waiting to be written; beyond it new ones are dropped (not announced later)



class ChunkRecord(NamedTuple):
    """What a router needs to know of one chunk: its parent's key (None for a prompt's first
    chunk), its tokens, and the LoRA adapter it was computed under (None: the base model)."""

    parent: bytes | None
    tokens: list[int]
    lora_name: str | None


def tokens_path(root: str, key: bytes, namespace: str) -> str:
    """Where the tokens of ``key``'s entry live; ValueError for a bad key or namespace."""
    if len(key) != _KEY_BYTES or not is_namespace(namespace):
        raise ValueError(f"not a storage key and namespace: {key!r}, {namespace!r}")
    name = key.hex()
    return os.path.join(root, namespace, name[:2], name + _SUFFIX)


def encode(record: ChunkRecord) -> bytes:
    """The clear bytes of ``record``'s file; ValueError for an adapter name over 65,535 bytes."""
    body = array.array("I", record.tokens)
    if sys.byteorder != "little":
        body.byteswap()
    flags = (_HAS_PARENT if record.parent is not None else 0) | (_HAS_LORA if record.lora_name is not None else 0)
    head = _HEAD.pack(_MAGIC, _VERSION, flags, record.parent or bytes(_KEY_BYTES), len(body))
    if record.lora_name is None:
        return head + body.tobytes()
    name = record.lora_name.encode("utf-8")
    if len(name) > 0xFFFF:
        raise ValueError(f"a LoRA adapter name of {len(name)} bytes")
    return head + body.tobytes() + _NAME_LENGTH.pack(len(name)) + name


def decode(data: bytes) -> ChunkRecord | None:
    """The record in a clear file's bytes; None when they are not a whole, valid file."""
    if len(data) < _HEAD.size:
        return None
    magic, version, flags, parent, count = _HEAD.unpack_from(data)
    end = _HEAD.size + 4 * count
    if magic != _MAGIC or version != _VERSION or flags & ~(_HAS_PARENT | _HAS_LORA) or len(data) < end:
        return None
    lora_name = None
    if flags & _HAS_LORA:
        if len(data) < end + _NAME_LENGTH.size:
            return None
        (length,) = _NAME_LENGTH.unpack_from(data, end)
        name_end = end + _NAME_LENGTH.size + length
        if len(data) != name_end:
            return None
        try:
            lora_name = data[end + _NAME_LENGTH.size:name_end].decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif len(data) != end:
        return None
    body = array.array("I")
    body.frombytes(data[_HEAD.size:end])
    if sys.byteorder != "little":
        body.byteswap()
    return ChunkRecord(parent if flags & _HAS_PARENT else None, body.tolist(), lora_name)


class ChunkTokenFiles:
    """Reads and writes the tokens files under a disk tier's ``root`` (see the module docstring).
    No mutable state: safe from any thread."""

    def __init__(self, root: str, sealer: "Sealer | None") -> None:
        self.root = root
        self.sealer = sealer

    def write(self, key: bytes, namespace: str, record: ChunkRecord) -> None:
        """Write the file of ``key`` (OSError when the disk refuses; the directory is the entry's)."""
        data = encode(record)
        if self.sealer is not None:
            data = bytes(self.sealer.seal(namespace.encode("utf-8"), _AAD + key, data))
        path = tokens_path(self.root, key, namespace)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)  # never through a link
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def read(self, key: bytes, namespace: str) -> ChunkRecord | None:
        """The record stored for ``key``; None when there is no valid file."""
        data = _read_regular_file(tokens_path(self.root, key, namespace))
        if data is None:
            return None
        if self.sealer is not None:
            clear = bytearray(max(0, len(data) - self.sealer.sealed_bytes(0)))
            if not self.sealer.open_into(namespace.encode("utf-8"), _AAD + key, data, memoryview(clear)):
                return None
            data = bytes(clear)
        return decode(data)

    def remove_orphans(self, live: Iterable[tuple[bytes, str]]) -> int:
        """Remove every tokens file whose ``(key, namespace)`` is not in ``live``; how many went."""
        keep = {(key.hex(), namespace) for key, namespace in live}
        removed = 0
        for namespace in _dirs(self.root):
            if not is_namespace(namespace.name):
                continue
            for subdir in _dirs(namespace.path):
                for item in _files(subdir.path):
                    match = TOKENS_NAME.fullmatch(item.name)
                    if match is not None and (match.group(1), namespace.name) not in keep:
                        try:
                            os.unlink(item.path)
                            removed += 1
                        except FileNotFoundError:
                            pass
        return removed


class TokenWriter:
    """Writes tokens files on its own thread, so the engine thread never waits for the disk.
    Chunks beyond ``_QUEUE_LIMIT`` waiting, and writes the disk refuses, are counted in
    ``num_dropped`` (their entries are then not announced after a restart, nothing worse)."""

    def __init__(self, files: ChunkTokenFiles) -> None:
        self.files = files
        self.num_dropped = 0
        self._queue: queue.Queue[tuple[bytes, str, ChunkRecord] | None] = queue.Queue(_QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._run, name="kvtier-token-files", daemon=True)
        self._thread.start()

    def submit(self, key: bytes, namespace: str, record: ChunkRecord) -> None:
        try:
            self._queue.put_nowait((key, namespace, record))
        except queue.Full:
            self.num_dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (within ``timeout_s``), then stop."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        unbind_this_thread()
        warned = False
        while (item := self._queue.get()) is not None:
            try:
                self.files.write(*item)
            except (OSError, ValueError) as exc:
                self.num_dropped += 1
                if not warned:
                    warned = True
                    logger.warning("kvtier: cannot write the tokens of disk entries for KV events "
                                   "(they will not be announced after a restart): %s", exc)


def _read_regular_file(path: str) -> bytes | None:
    """The bytes of ``path`` when it is a regular file of at most ``_MAX_FILE_BYTES``, opened
    without following a symbolic link or blocking on a FIFO; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_FILE_BYTES:
            return None
        return os.pread(fd, info.st_size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _dirs(path: str) -> list[os.DirEntry]:
    return [entry for entry in _scandir(path) if entry.is_dir(follow_symlinks=False)]


def _files(path: str) -> list[os.DirEntry]:
    return [entry for entry in _scandir(path) if entry.is_file(follow_symlinks=False)]


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []
