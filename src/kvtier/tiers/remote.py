"""Remote tiers: a shared store reached over the network (Redis/Valkey, S3). The contract.

Object names: ``kvtier/<namespace>/<32 hex key>.<rank>`` (S3: under the URL's prefix), so a
tenant's entries can be listed and removed together (``delete_namespace``). A value is an entry
(``kvtier.entry``: header, then payload), so every value says which key, rank and layout it
holds and is verified (header, length, checksum) on every read. A value that does not match its
key, is truncated, corrupt or of another layout reads as ``ReadResult.CORRUPT``: it is counted in
``num_corrupt``, deleted best-effort, and its bytes never reach the caller as data. A value this
tier cannot open (sealed under another master key, not authenticating, or of another encryption
or compression setting) reads as ``ReadResult.UNREADABLE``: a miss, counted in
``num_unreadable``, and left in place, so a reader with the wrong key never wipes the store.

Encryption at rest: a tier opened with a ``Sealer`` (``open_remote(..., sealer=...)``) seals every
payload it puts (AES-256-GCM, ``kvtier.crypto``; ``tiers/framing.py``) and reads only sealed
values; a value that does not authenticate (altered, swapped with another key's, sealed for
another namespace label or under another master key) reads UNREADABLE and is left in place.
Compression (``open_remote(..., codec=...)``, ``kvtier.compression``): a tier with a codec puts
compressed values (lossy, several times smaller) and reads compressed and uncompressed ones; a
tier without reads a compressed value as UNREADABLE. Sealed or compressed reads land in temporary
buffers (at most the sealed or raw length, about ``remote_reads.SEALED_GROUP_BYTES`` at a time), then are
decrypted and decoded into the caller's buffers. Engines sharing a store must share its
encryption and compression settings: each reads the others' values as UNREADABLE (misses).

Failure model: no method raises on I/O failure. A failed call returns a miss (``MISSING``,
``False``, ``0``), increments ``num_errors`` and marks the tier unhealthy. While unhealthy,
calls return misses at once, without touching the network, until ``retry_after_s`` has passed
(exponential backoff from 1 s, doubling up to 30 s); the next call then probes the server, and
a success marks the tier healthy again. Each public call has one wall-clock deadline,
``timeout_s`` after it starts, for all of it (every group of a batched read, connecting, every
send and receive: ``CallDeadline``, by which backends bound each blocking operation). No retries,
so a call against a dead, stalled or slow server returns a miss within about ``timeout_s``. A
server unreachable at start leaves the tier unhealthy, with a warning; bad configuration raises
``ConfigError``.

Threading: every method may be called from any thread, by one thread at a time per instance.

Backends subclass ``RemoteTier`` and implement the underscore primitives of
``kvtier.tiers.remote_backend.RemoteBackend``; the public methods (the tier contract of
``kvtier.tiers.contract``, naming, entry framing) live here once, with the tier's health
(``kvtier.tiers.remote_health``) and its verified batch reads (``kvtier.tiers.remote_reads``).
Backends are loaded lazily by URL scheme (``open_remote``), so redis-py and boto3 are imported
only when used.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvtier.compression import KVCodec
from kvtier.config import NAMESPACE_RULE, REMOTE_SCHEMES, check_client_certificate, is_namespace, mask_url
from kvtier.crypto import Sealer
from kvtier.errors import ConfigError
from kvtier.tiers.contract import ReadResult
from kvtier.tiers.deadline import CallDeadline
from kvtier.tiers.framing import frame
from kvtier.tiers.remote_backend import RemoteBackend
from kvtier.tiers.remote_health import FIRST_BACKOFF_S, MAX_BACKOFF_S, RemoteHealth
from kvtier.tiers.remote_reads import EntryReader, Fetched

__all__ = ["FIRST_BACKOFF_S", "MAX_BACKOFF_S", "CallDeadline", "Fetched", "RemoteBackend", "RemoteOptions",
           "RemoteTier", "namespace_prefix", "object_name", "open_remote"]

logger = logging.getLogger(__name__)

OBJECT_PREFIX = "kvtier/"
INSTALL_HINT = "pip install 'kvtier[remote]'"

# scheme -> module that implements it; each module has ``open_tier(url, options) -> RemoteTier``.
# the module of each scheme that the config accepts (one list: config.REMOTE_SCHEMES)
_BACKENDS = {scheme: "kvtier.tiers.s3_tier" if scheme == "s3" else "kvtier.tiers.redis_tier"
             for scheme in REMOTE_SCHEMES}

_T = TypeVar("_T")


@dataclass(frozen=True)
class RemoteOptions:
    """Everything a backend needs besides its URL. Checked on construction (``ConfigError``)."""

    ttl_s: int | None
    timeout_s: float
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None  # client certificate and key, for servers that require one
    tls_key: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    sealer: Sealer | None = None  # encryption at rest; None = values in clear
    codec: KVCodec | None = None  # compression; None = values as the engine computed them

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError("remote.timeout_s", f"must be positive, got {self.timeout_s}")
        check_client_certificate(self.tls_cert, self.tls_key)
        for key, path in (("remote.tls_ca", self.tls_ca), ("remote.tls_cert", self.tls_cert),
                          ("remote.tls_key", self.tls_key)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(key, f"file not found: {path}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ConfigError("remote.ttl_s", f"must be positive or unset, got {self.ttl_s}")


def object_name(key: bytes, rank: int, namespace: str) -> str:
    """``kvtier/<namespace>/<32 hex key>.<rank>``: the name of one chunk shard in a remote store."""
    if len(key) != 16:
        raise ValueError(f"a storage key is 16 bytes, got {len(key)}")
    return f"{namespace_prefix(namespace)}{key.hex()}.{rank}"


def namespace_prefix(namespace: str) -> str:
    """``kvtier/<namespace>/``, the start of every name of ``namespace``'s entries; ValueError
    for a name that is not a namespace (it must never widen a prefix)."""
    if not is_namespace(namespace):
        raise ValueError(f"namespace {namespace!r} is not {NAMESPACE_RULE}")
    return f"{OBJECT_PREFIX}{namespace}/"


class RemoteTier(RemoteBackend):
    """Shared store reached over the network; see the module docstring for the contract."""

    #: Whether engines upload their stored chunks to this tier (False for the peer tier, whose
    #: entries stay in each instance's own memory and disk and are served from there).
    stores_uploads: bool = True

    def __init__(self, description: str, timeout_s: float, sealer: Sealer | None = None,
                 codec: KVCodec | None = None) -> None:
        """``description`` names the store in logs (never with credentials); ``sealer`` turns on
        encryption at rest, ``codec`` compression. Backends call ``self._start()`` at the end of
        their own ``__init__``."""
        self.description = description
        self.timeout_s = timeout_s
        self.sealer = sealer
        self.codec = codec
        self.num_errors = 0
        self.num_unreadable = 0  # values of another master key or setting, left in place
        self.num_corrupt = 0
        # Bytes of values as stored (header + payload, compressed and/or sealed) that reached this
        # process from good reads and left it in successful puts: what the network carried.
        self.value_bytes_read = 0
        self.value_bytes_written = 0
        self.reader = EntryReader(description, sealer, codec)  # groups and verification of reads
        self.health = RemoteHealth(description)
        self.deadline = CallDeadline()  # of the public call in progress
        self._connected = False

    # ----------------------------------------------------------------- public contract

    def exists_prefix(self, keys: Sequence[bytes], rank: int, *, namespace: str, max_age_s: int = 0) -> int:
        """How many consecutive ``keys`` of ``namespace`` from the start the store holds for
        ``rank`` (one round trip where the backend allows). 0 on failure or while unhealthy.
        ``max_age_s`` (the namespace's TTL; 0: none): on backends without per-entry expiry (S3),
        an older entry counts as absent; the others expire entries themselves (``put``'s TTL)."""
        return len(self.held_ages(keys, rank, namespace=namespace, max_age_s=max_age_s))

    def held_ages(self, keys: Sequence[bytes], rank: int, *, namespace: str, max_age_s: int = 0) -> list[float]:
        """``exists_prefix`` with, for each chunk held, the seconds since it was written, so that
        a chunk fetched into memory keeps its age (a fetch must not restart a TTL). 0.0 where the
        backend cannot tell. [] on failure or while unhealthy."""
        if not keys:
            return []
        names = [self.name_for(key, rank, namespace) for key in keys]
        return self._guarded(lambda: self._prefix_ages(names, max_age_s), [])

    def get_into(self, key: bytes, rank: int, out: memoryview, layout_fingerprint: bytes, *,
                 namespace: str) -> ReadResult:
        """Fetch the entry of ``(key, rank)``, verify it, and copy its payload into ``out``
        (exactly the expected payload size). Unless OK, the content of ``out`` is unspecified."""
        return self.get_many_into([(key, out)], rank, layout_fingerprint, namespace=namespace)[0]

    def get_many_into(self, items: Sequence[tuple[bytes, memoryview]], rank: int, layout_fingerprint: bytes,
                      *, namespace: str) -> list[ReadResult]:
        """``get_into`` for many keys of ``namespace`` in one batch (pipelined or concurrent),
        results in order.

        An I/O failure fails the whole batch: every result is MISSING (nothing partial is OK)."""
        if not items:
            return []
        outs = [memoryview(out).cast("B") for _, out in items]
        names = [self.name_for(key, rank, namespace) for key, _ in items]
        started = self.deadline.start(self.timeout_s)  # one deadline for every group of the batch
        try:
            results = self._get_groups(items, outs, names, rank, layout_fingerprint, namespace)
        finally:
            if started:
                self.deadline.clear()
        if results is None:
            return [ReadResult.MISSING] * len(items)
        self.num_unreadable += sum(result is ReadResult.UNREADABLE for result in results)
        corrupt = [name for name, result in zip(names, results) if result is ReadResult.CORRUPT]
        if corrupt:
            self.num_corrupt += len(corrupt)
            self._delete_quietly(corrupt)
        return results

    def _get_groups(self, items: Sequence[tuple[bytes, memoryview]], outs: list[memoryview], names: list[str],
                    rank: int, layout_fingerprint: bytes, namespace: str) -> list[ReadResult] | None:
        """Fetch and verify ``items`` group by group (``EntryReader.groups``); None when a group failed."""
        results = []
        for start, stop in self.reader.groups(outs):
            stores = self.reader.landing(outs[start:stop])
            group = list(zip(names[start:stop], stores))
            fetched = self._guarded(functools.partial(self._fetch_many, group), None)
            if fetched is None:
                return None
            checks = [functools.partial(self.reader.verify, found, key, rank, layout_fingerprint, stored, out, name,
                                        namespace)
                      for found, (key, _), stored, out, name
                      in zip(fetched, items[start:stop], stores, outs[start:stop], names[start:stop])]
            group_results = self.reader.run_checks(checks)
            self.value_bytes_read += sum(found.value_bytes for found, result in zip(fetched, group_results)
                                         if found is not None and result is ReadResult.OK)
            results += group_results
        return results

    def put(self, key: bytes, rank: int, payload: bytes | memoryview, layout_fingerprint: bytes, *,
            namespace: str, ttl_s: int = 0) -> bool:
        """Store the entry of ``(key, rank)`` of ``namespace`` (header + payload, sealed for
        ``namespace`` when the tier has a sealer) with the tier's TTL, or ``ttl_s`` when shorter
        (backends that can expire single entries), unless the store already holds that name
        (never overwritten, TTL not refreshed). True when the entry is there afterwards (written
        now or before), False on failure or while unhealthy."""
        header, stored = frame(key, rank, layout_fingerprint, memoryview(payload).cast("B"), self.sealer,
                               namespace, self.codec)
        name = self.name_for(key, rank, namespace)
        ttls = [ttl for ttl in (self.default_ttl_s, ttl_s) if ttl]
        done = self._guarded(lambda: self._put_new(name, header, stored, min(ttls) if ttls else None), False)
        if done:
            self.value_bytes_written += len(header) + stored.nbytes
        return done

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]], rank: int, layout_fingerprint: bytes,
                 *, namespace: str, ttl_s: int = 0) -> list[bool]:
        """``put`` for each ``(key, payload)``, under one deadline for the whole batch (after a
        failure the rest return False at once: the tier is backing off)."""
        started = self.deadline.start(self.timeout_s)
        try:
            return [self.put(key, rank, payload, layout_fingerprint, namespace=namespace, ttl_s=ttl_s)
                    for key, payload in items]
        finally:
            if started:
                self.deadline.clear()

    def delete(self, keys: Sequence[bytes], rank: int, *, namespace: str) -> int:
        """Remove the entries of ``keys`` of ``namespace`` for ``rank``; returns how many the
        server removed (S3 cannot tell absent from removed: it counts every name it accepted).
        0 on failure."""
        if not keys:
            return 0
        names = [self.name_for(key, rank, namespace) for key in keys]
        return self._guarded(lambda: self._delete_many(names), 0)

    def delete_namespace(self, namespace: str) -> int | None:
        """Remove every entry of ``namespace`` (all keys, all ranks); how many went, or None on
        failure or while unhealthy (nothing is known to be removed)."""
        prefix = self.name_for_prefix(namespace_prefix(namespace))
        return self._guarded(lambda: self._delete_prefix(prefix), None)

    def name_for(self, key: bytes, rank: int, namespace: str) -> str:
        """The store's name for the entry of ``(key, rank)`` (``object_name``, plus a backend prefix)."""
        return self.name_for_prefix(object_name(key, rank, namespace))

    def name_for_prefix(self, name: str) -> str:
        """``name`` with the backend's own prefix (none by default)."""
        return name

    @property
    def default_ttl_s(self) -> int | None:
        """The TTL every put gets (None: entries never expire); backends set it."""
        return None

    @property
    def healthy(self) -> bool:
        """False from an I/O failure until a later call succeeds."""
        return self.health.healthy

    @property
    def retry_after_s(self) -> float:
        """Seconds until an unhealthy tier lets the next call probe the server (0.0 when healthy
        or when a probe is due)."""
        return self.health.retry_after_s

    def close(self) -> None:
        """Release connections and threads. Idempotent; never raises on I/O failure."""
        self.reader.close()
        try:
            self._close()
        except self.io_errors as exc:
            logger.debug("kvtier: closing %s: %s", self.description, exc)

    # ----------------------------------------------------------------- health and checks

    def _start(self) -> None:
        """First contact; an unreachable server leaves the tier unhealthy, with a warning."""
        self._guarded(lambda: None, None)

    def _guarded(self, call: Callable[[], _T], on_failure: _T) -> _T:
        """Run ``call`` unless backing off; an I/O failure returns ``on_failure``."""
        if self.health.backing_off():
            return on_failure
        started = self.deadline.start(self.timeout_s)
        try:
            if not self._connected:
                self._connect()
                self._connected = True
            result = call()
        except self.io_errors as exc:
            self.num_errors += 1
            self.health.failed(exc)
            return on_failure
        finally:
            if started:
                self.deadline.clear()
        self.health.succeeded()
        return result

    def _delete_quietly(self, names: Sequence[str]) -> None:
        try:
            self._delete_many(names)
        except self.io_errors as exc:
            logger.warning("kvtier: cannot delete bad remote entries in %s: %s", self.description, exc)


def open_remote(url: str, *, ttl_s: int | None, timeout_s: float, username: str | None = None,
                password: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None, s3_endpoint: str | None = None,
                s3_region: str | None = None, access_key: str | None = None,
                secret_key: str | None = None, sealer: Sealer | None = None,
                codec: KVCodec | None = None) -> RemoteTier:
    """The remote tier named by ``url``: ``redis://``, ``rediss://`` (TLS),
    ``redis+cluster://h:p,h:p``, ``rediss+cluster://...`` or ``s3://bucket/prefix``; with
    ``sealer``, values are encrypted at rest (``kvtier.crypto.load_sealer``); with ``codec``,
    compressed (``kvtier.compression``).

    Raises ``ConfigError("remote.url", ...)`` for an unknown scheme, a malformed URL, or a
    missing client library (naming the install step). Never raises because the server is down.
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in _BACKENDS:
        raise ConfigError("remote.url", f"unknown scheme {scheme!r} in {mask_url(url)!r}; "
                                        f"expected one of {', '.join(f'{s}://' for s in _BACKENDS)}")
    options = RemoteOptions(ttl_s, timeout_s, username, password, tls_ca, tls_cert, tls_key, s3_endpoint, s3_region,
                            access_key, secret_key, sealer, codec)
    try:
        module = importlib.import_module(_BACKENDS[scheme])
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("kvtier"):
            raise
        raise ConfigError("remote.url", f"{scheme}:// needs the {exc.name!r} package: {INSTALL_HINT}") from exc
    tier: RemoteTier = module.open_tier(url, options)
    return tier
