"""The admin operations on one engine's books and tiers: stats, lookup, invalidation, limits.

No HTTP here (``http.py`` does that) and no engine: the service works on the engine's own books
through its ``KVManager`` (the engine-neutral core every integration uses: vLLM's scheduler side,
the transformers integration), under the lock the engine integration holds for every one of its
own calls, so a book change is atomic with respect to the engine's lookups and plans. It keeps no
books of its own; its tier handles (``kvtier.tiers.contract``) only ask the remote and delete
bytes. Byte deletions (disk files, remote entries) run after the books changed, outside the lock:
from the moment the books change no lookup finds the entries, and the engine never waits on a
remote delete.

Invalidation reaches the tiers in this order and reports the time each took:
1. memory and disk books (``KVManager.invalidate``): the entries are unreachable (leased or
   in-flight ones are doomed and their slots freed when the lease ends; see
   ``kvtier.tenant_control``), and the engine forgets which chunks the remote holds, so it
   uploads them again when recomputed;
2. disk files: removed now from this process; the engine's disk writer also gets the deletes
   in its next step plan, queued behind any write in flight, so no file outlives them;
3. remote: removed by name (keys) or by listing the namespace's prefix (whole namespace).
A token-prefix invalidation removes the chunks of those tokens: longer prefixes that extend them
become unreachable (a lookup stops at the first missing chunk) until the prefix is computed again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvtier.config import NamespaceLimits
from kvtier.keys import Namespace, chunk_keys
from kvtier.manager import KVManager
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.remote import RemoteTier


@dataclass(frozen=True)
class StoreShape:
    """The sizes the service reports and computes with."""

    chunk_tokens: int
    chunk_bytes: int
    num_slots: int
    disk_capacity_entries: int  # 0: no disk tier
    num_shards: int  # shards of a chunk on disk and remote: one per rank, or 1 for MLA (every rank holds the same)


class AdminService:
    """Admin operations of one engine. Thread-safe: every book access holds ``lock``."""

    def __init__(self, lock: threading.RLock, manager: KVManager, namespace: Namespace, shape: StoreShape,
                 disk: DiskFiles | None, remote: RemoteTier | None) -> None:
        """``manager``: the engine's core, used under ``lock``; ``namespace``: the engine's key
        namespace (tenant and salt are replaced per call); ``disk`` / ``remote``: handles owned
        by the service (not the engine's, which other threads use)."""
        self._lock = lock
        self._manager = manager
        self._store = manager.store
        self._namespace = namespace
        self.shape = shape
        self._disk = disk
        self._remote = remote
        self._remote_lock = threading.Lock()  # one thread at a time per RemoteTier

    def keys_of(self, namespace: str, salt: str, token_ids: Sequence[int]) -> list[bytes]:
        """Chunk keys of the full chunks of ``token_ids`` in ``namespace`` (with vLLM's
        ``cache_salt`` ``salt``, "" when none)."""
        digest = replace(self._namespace, tenant=namespace, salt=salt).digest()
        return [key.digest for key in chunk_keys(digest, token_ids, self.shape.chunk_tokens)]

    def health(self) -> dict[str, object]:
        remote = None if self._remote is None else self._remote.healthy
        return {"status": "ok" if remote is not False else "degraded", "remote_healthy": remote}

    def stats(self) -> dict[str, object]:
        with self._lock:
            usage = self._store.tenants.usage()
            memory_entries, disk_entries = self._store.num_memory_entries, self._store.num_disk_entries
        chunk = self.shape.chunk_bytes
        return {
            "chunk_tokens": self.shape.chunk_tokens, "chunk_bytes": chunk,
            "memory": {"entries": memory_entries, "capacity_entries": self.shape.num_slots},
            "disk": {"enabled": self._disk is not None, "entries": disk_entries,
                     "capacity_entries": self.shape.disk_capacity_entries},
            "remote": {"enabled": self._remote is not None,
                       "description": None if self._remote is None else self._remote.description,
                       "healthy": None if self._remote is None else self._remote.healthy},
            "namespaces": {name: {"memory_entries": item.memory, "memory_bytes": item.memory * chunk,
                                  "disk_entries": item.disk, "disk_bytes": item.disk * chunk}
                           for name, item in usage.items()},
        }

    def lookup(self, namespace: str, salt: str, token_ids: Sequence[int]) -> dict[str, object]:
        """How much of ``token_ids`` each tier could serve now (memory and disk from the books,
        then the remote for the chunks after them)."""
        keys = self.keys_of(namespace, salt, token_ids)
        with self._lock:
            found = self._store.lookup(keys)
            ttl = self._store.tenants.ttl_of(namespace)
        on_disk = len(found.disk_only)
        remote = 0
        if self._remote is not None and found.num_chunks < len(keys):
            with self._remote_lock:
                remote = self._remote.exists_prefix(keys[found.num_chunks:], 0, namespace=namespace, max_age_s=ttl)
        chunks = found.num_chunks + remote
        return {"namespace": namespace, "chunks": len(keys), "cached_chunks": chunks,
                "cached_tokens": chunks * self.shape.chunk_tokens,
                "by_tier": {"memory": found.num_chunks - on_disk, "disk": on_disk, "remote": remote}}

    def invalidate(self, namespace: str, keys: Sequence[bytes] | None) -> dict[str, object]:
        """Remove ``namespace``'s entries (``keys`` None: all of them) from every tier; the
        counts and the seconds each tier took (cumulative from the start)."""
        started = time.perf_counter()
        with self._lock:
            removed = self._manager.invalidate(namespace, None if keys is None else set(keys))
        books_s = time.perf_counter() - started
        report: dict[str, object] = {
            "namespace": namespace, "scope": "namespace" if keys is None else "keys",
            "memory": {"entries": removed.memory, "seconds": books_s},
        }
        if self._disk is not None:
            files = self._delete_disk(namespace, keys)
            report["disk"] = {"entries": removed.disk, "files": files, "seconds": time.perf_counter() - started}
        if self._remote is not None:
            deleted = self._delete_remote(namespace, keys)
            report["remote"] = {"entries": deleted, "ok": deleted is not None,
                                "seconds": time.perf_counter() - started}
        report["seconds"] = time.perf_counter() - started
        return report

    def namespaces(self) -> dict[str, object]:
        """Limits and usage of every namespace that has either."""
        with self._lock:
            limits, usage = self._store.tenants.limits(), self._store.tenants.usage()
        return {name: {**_limits_json(limits.get(name, NamespaceLimits())),
                       "memory_entries": usage[name].memory if name in usage else 0,
                       "disk_entries": usage[name].disk if name in usage else 0}
                for name in sorted(set(limits) | set(usage))}

    def set_limits(self, namespace: str, limits: NamespaceLimits) -> dict[str, object]:
        """Replace ``namespace``'s TTL and quotas (until the engine restarts: the configuration's
        ``namespace_limits`` is what a restart applies)."""
        with self._lock:
            removed = self._store.tenants.set_limits(namespace, limits)
        return {"namespace": namespace, **_limits_json(limits),
                "removed": {"memory": removed.memory, "disk": removed.disk}}

    def current_limits(self, namespace: str) -> NamespaceLimits:
        with self._lock:
            return self._store.tenants.limits().get(namespace, NamespaceLimits())

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()

    def _delete_disk(self, namespace: str, keys: Sequence[bytes] | None) -> int:
        assert self._disk is not None
        if keys is None:
            return self._disk.delete_namespace(namespace)
        return sum(self._disk.delete(keys, rank, namespace=namespace) for rank in range(self.shape.num_shards))

    def _delete_remote(self, namespace: str, keys: Sequence[bytes] | None) -> int | None:
        assert self._remote is not None
        with self._remote_lock:
            if keys is None:
                return self._remote.delete_namespace(namespace)
            if not self._remote.healthy and self._remote.retry_after_s > 0:
                return None
            removed = 0
            for rank in range(self.shape.num_shards):
                removed += self._remote.delete(list(keys), rank, namespace=namespace)
            return removed if self._remote.healthy else None


def _limits_json(limits: NamespaceLimits) -> dict[str, int]:
    return {"ttl_s": limits.ttl_s, "memory_quota_bytes": limits.memory_bytes, "disk_quota_bytes": limits.disk_bytes}
