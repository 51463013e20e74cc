"""Background uploads to a remote tier through a bounded queue (worker side).

The engine thread submits copies of freshly stored chunks; one daemon thread uploads them in order.
When the queue is full the upload is dropped and counted: the engine never waits on the network.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from kvtier.tiers.remote import RemoteTier


@dataclass(frozen=True)
class _Upload:
    key: bytes
    rank: int
    payload: bytes
    namespace: str
    ttl_s: int


class RemoteUploader:
    def __init__(self, remote: RemoteTier, layout_fingerprint: bytes, queue_depth: int) -> None:
        self._remote = remote
        self._layout_fingerprint = layout_fingerprint
        self._queue: queue.Queue[_Upload | None] = queue.Queue(maxsize=queue_depth)
        self._lock = threading.Lock()
        self._done: list[bytes] = []
        self._failed: list[bytes] = []
        self._thread = threading.Thread(target=self._run, name="kvtier-uploader", daemon=True)
        self._thread.start()

    def submit(self, key: bytes, rank: int, payload: bytes, *, namespace: str, ttl_s: int = 0) -> bool:
        """Queue an upload (``RemoteTier.put``: sealed for ``namespace`` on the upload thread when
        the tier has a sealer; ``ttl_s`` as there); False (dropped) when the queue is full. Never
        blocks."""
        try:
            self._queue.put_nowait(_Upload(key, rank, payload, namespace, ttl_s))
        except queue.Full:
            return False
        return True

    def take_results(self) -> tuple[list[bytes], list[bytes]]:
        """Keys uploaded (or already present) and keys that failed, since the last call."""
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = [], []
        return done, failed

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued upload has been attempted (tests, shutdown)."""
        finished = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), finished.set()), daemon=True).start()
        return finished.wait(timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                ok = self._remote.put(item.key, item.rank, item.payload, self._layout_fingerprint,
                                      namespace=item.namespace, ttl_s=item.ttl_s)
                with self._lock:
                    (self._done if ok else self._failed).append(item.key)
            finally:
                self._queue.task_done()
