"""Background uploads to a remote tier through a bounded queue (worker side).

The engine thread submits copies of freshly stored chunks; one daemon thread uploads them in order.
When the queue is full the upload is dropped and counted: the engine never waits on the network.

Invalidation beats queued uploads: ``remove`` drops the queued uploads of the invalidated
entries (a namespace, or some of its keys) and queues their deletion behind everything still in
flight, so an upload that was already running when the invalidation came is deleted after it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Collection
from dataclasses import dataclass

from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.remote import RemoteTier


@dataclass(frozen=True)
class _Upload:
    key: bytes
    rank: int
    payload: bytes
    namespace: str
    ttl_s: int


@dataclass(frozen=True)
class _Removal:
    namespace: str
    keys: tuple[bytes, ...] | None  # None: every entry of the namespace
    rank: int


class RemoteUploader:
    def __init__(self, remote: RemoteTier, layout_fingerprint: bytes, queue_depth: int) -> None:
        self._remote = remote
        self._layout_fingerprint = layout_fingerprint
        self._queue_depth = queue_depth
        self._ops: collections.deque[_Upload | _Removal] = collections.deque()
        self._num_uploads = 0  # queued
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._done: list[bytes] = []
        self._failed: list[bytes] = []
        self._thread = threading.Thread(target=self._run, name="kvtier-uploader", daemon=True)
        self._thread.start()

    def submit(self, key: bytes, rank: int, payload: bytes, *, namespace: str, ttl_s: int = 0) -> bool:
        """Queue an upload (``RemoteTier.put``: sealed for ``namespace`` on the upload thread when
        the tier has a sealer; ``ttl_s`` as there); False (dropped) when the queue is full. Never
        blocks."""
        with self._cond:
            if self._closed or self._num_uploads >= self._queue_depth:
                return False
            self._ops.append(_Upload(key, rank, payload, namespace, ttl_s))
            self._num_uploads += 1
            self._cond.notify_all()
        return True

    def remove(self, namespace: str, keys: Collection[bytes] | None, rank: int) -> int:
        """Invalidate ``namespace`` (``keys`` None) or its ``keys``: drop their queued uploads
        (reported as failed) and queue their deletion after whatever is in flight. Returns how
        many queued uploads were dropped."""
        wanted = None if keys is None else frozenset(keys)
        with self._cond:
            kept: collections.deque[_Upload | _Removal] = collections.deque()
            dropped: list[bytes] = []
            for op in self._ops:
                if isinstance(op, _Upload) and op.namespace == namespace and (wanted is None or op.key in wanted):
                    dropped.append(op.key)
                else:
                    kept.append(op)
            self._ops = kept
            self._num_uploads -= len(dropped)
            self._failed.extend(dropped)
            if not self._closed:
                self._ops.append(_Removal(namespace, None if keys is None else tuple(keys), rank))
                self._cond.notify_all()
        return len(dropped)

    @property
    def num_queued_uploads(self) -> int:
        """Uploads queued (at most ``queue_depth``)."""
        with self._cond:
            return self._num_uploads

    def take_results(self) -> tuple[list[bytes], list[bytes]]:
        """Keys uploaded (or already present) and keys that failed or were dropped, since the last call."""
        with self._cond:
            done, failed = self._done, self._failed
            self._done, self._failed = [], []
        return done, failed

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued operation has been attempted (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._ops and not self._busy, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        unbind_this_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._ops or self._closed)
                if not self._ops:
                    return
                op = self._ops.popleft()
                self._busy = True
            ok = False
            try:
                if isinstance(op, _Upload):
                    ok = self._remote.put(op.key, op.rank, op.payload, self._layout_fingerprint,
                                          namespace=op.namespace, ttl_s=op.ttl_s)
                elif op.keys is None:
                    self._remote.delete_namespace(op.namespace)
                else:
                    self._remote.delete(op.keys, op.rank, namespace=op.namespace)
            finally:
                with self._cond:
                    if isinstance(op, _Upload):
                        self._num_uploads -= 1
                        (self._done if ok else self._failed).append(op.key)
                    self._busy = False
                    self._cond.notify_all()
