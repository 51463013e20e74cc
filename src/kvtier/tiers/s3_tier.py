"""S3 remote tier (boto3 is imported only here). Contract: ``tiers/remote.py``.

URL ``s3://bucket[/prefix]``; entries are objects ``<prefix>/kvtier/<namespace>/<32 hex key>.<rank>``.
Options: ``s3_endpoint`` (any S3-compatible server; path-style addressing is used with it),
``s3_region``, ``access_key``/``secret_key`` (else boto3's usual credential chain), ``tls_ca``
(CA bundle used to verify an https endpoint), ``tls_cert``/``tls_key`` (client certificate for
servers that require one). Connect and read timeouts are ``timeout_s``; boto3's own
retries are off. Deadlines: each call of the tier is bounded as a whole by ``timeout_s``
(``CallDeadline``): a batch waits for its requests until then, a body is read and a value sent
in pieces that each check the deadline (and a body's socket waits at most what is left of it),
so a value trickling over a slow link is given up at the deadline. A request stalled before its
body (connecting, sending, waiting for the status line) ends at its socket timeout, so a call
returns within ``timeout_s`` plus at most one socket timeout in that case (running requests are
always waited for: they write into the caller's buffers).

Data path: PUT with ``If-None-Match: *`` (an existing object is left alone; 412
PreconditionFailed and 409 ConditionalRequestConflict mean "already there or being written":
True). Batches of GETs and HEADs run concurrently on a small thread pool owned by the tier; a
batch stops at its first failure and waits for its running requests (they write into the
caller's buffers) before returning. boto3's CRC checksums are off unless an operation requires
them: every entry carries its own xxh3 checksum.

TTL: S3 has no per-object TTL. An object older than ``ttl_s`` (or, at a lookup, than its
namespace's TTL, passed as ``max_age_s``) (server clock: its Last-Modified
against the response's Date) reads as absent and is deleted best-effort, so the next put
rewrites it. Storage is reclaimed only by reads or by a bucket lifecycle rule, which the
operator sets (kvtier does not change bucket configuration).
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import io
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TypeVar

import boto3
import urllib3.exceptions
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import URLLib3Session
from urllib3.util.ssl_ import create_urllib3_context

from kvtier.entry import HEADER_BYTES
from kvtier.config import mask_url
from kvtier.errors import ConfigError
from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.remote import CallDeadline, Fetched, RemoteOptions, RemoteTier

logger = logging.getLogger(__name__)

_NUM_THREADS = 4  # concurrent requests per batch
_HEAD_WAVE = 8  # exists_prefix asks this many names at a time, stopping at the first absent one
_DELETE_BATCH = 1000  # the S3 limit per DeleteObjects
_ABSENT_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_ALREADY_THERE_CODES = frozenset({"412", "PreconditionFailed", "409", "ConditionalRequestConflict"})
_BODY_PIECE_BYTES = 16 << 10  # a value is read and sent in pieces of this size, each checking the deadline

_T = TypeVar("_T")


class S3Tier(RemoteTier):
    """Entries as objects of one bucket, under one prefix."""

    io_errors = (BotoCoreError, ClientError, urllib3.exceptions.HTTPError, OSError)

    def __init__(self, bucket: str, prefix: str, options: RemoteOptions) -> None:
        """Checks the bucket at once; an unreachable server leaves the tier unhealthy."""
        super().__init__(f"s3://{bucket}/{prefix}", options.timeout_s, options.sealer, options.codec)
        self.bucket = bucket
        self.prefix = prefix
        self.ttl_s = options.ttl_s
        self._options = options
        self._client: BaseClient | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="kvtier-s3",
                                                           initializer=unbind_this_thread)
        self._start()

    def name_for_prefix(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def client(self) -> BaseClient:
        """The boto3 S3 client; for tests and benchmarks."""
        if self._client is None:
            self._client = _make_client(self._options)
        return self._client

    def _connect(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def _count_prefix(self, names: Sequence[str], max_age_s: int) -> int:
        return len(self._prefix_ages(names, max_age_s))

    def _prefix_ages(self, names: Sequence[str], max_age_s: int) -> list[float]:
        ages: list[float] = []
        for start in range(0, len(names), _HEAD_WAVE):
            found = self._run_all(lambda name: self._age(name, max_age_s), names[start:start + _HEAD_WAVE])
            for age in found:
                if age is None:
                    return ages
                ages.append(age)
        return ages

    def _age(self, name: str, max_age_s: int = 0) -> float | None:
        """Seconds since the object was written (server clock), None when absent or expired."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _error_code(exc) in _ABSENT_CODES:
                return None
            raise
        if self._expired(name, response, max_age_s):
            return None
        return max(0.0, _age_s(response))

    def _fetch_many(self, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        return self._run_all(lambda item: self._fetch(*item), items)

    def _fetch(self, name: str, out: memoryview) -> Fetched | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _error_code(exc) in _ABSENT_CODES:
                return None
            raise
        body = response["Body"]
        try:
            if self._expired(name, response):
                return None
            value_bytes = int(response["ContentLength"])
            if value_bytes < HEADER_BYTES:
                return Fetched(b"", value_bytes)
            header = bytearray(HEADER_BYTES)
            _read_exact(body, memoryview(header), self.deadline, self.timeout_s)
            if value_bytes > HEADER_BYTES + out.nbytes:  # too long: the header only (whose setting?)
                return Fetched(bytes(header), value_bytes)
            _read_exact(body, out[:value_bytes - HEADER_BYTES], self.deadline, self.timeout_s)
            return Fetched(bytes(header), value_bytes)
        finally:
            body.close()

    def _put_new(self, name: str, header: bytes, payload: memoryview, ttl_s: int | None) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=name,
                                   Body=_DeadlineBody(b"".join((header, payload)), self.deadline), IfNoneMatch="*")
        except ClientError as exc:
            if _error_code(exc) in _ALREADY_THERE_CODES:
                return True
            raise
        return True

    def _delete_many(self, names: Sequence[str]) -> int:
        num_deleted = 0
        for start in range(0, len(names), _DELETE_BATCH):
            batch = names[start:start + _DELETE_BATCH]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": name} for name in batch], "Quiet": True})
            num_deleted += len(batch) - len(response.get("Errors", []))
        return num_deleted

    def _delete_prefix(self, prefix: str) -> int:
        removed = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            names = [item["Key"] for item in page.get("Contents", [])]
            if names:
                removed += self._delete_many(names)
        return removed

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._client is not None:
            self.client.close()

    def _expired(self, name: str, response: dict[str, object], max_age_s: int = 0) -> bool:
        """True (and the object deleted best-effort) when the object is older than ``ttl_s`` or
        than ``max_age_s`` (a namespace's TTL; 0: none)."""
        limits = [limit for limit in (self.ttl_s, max_age_s) if limit]
        if not limits:
            return False
        if _age_s(response) <= min(limits):
            return False
        self._delete_quietly([name])
        return True

    def _run_all(self, call: Callable[[_T], object], items: Sequence[_T]) -> list:  # type: ignore[type-arg]
        """``call`` on every item on the pool, results in order. After the first failure no
        further item starts; the failure is re-raised once every running call has ended."""
        failed = threading.Event()

        def run(item: _T) -> object:
            if failed.is_set():
                raise _Skipped()
            try:
                return call(item)
            except BaseException:
                failed.set()
                raise

        futures = [self._pool.submit(run, item) for item in items]
        try:
            remaining = self.deadline.remaining_s()
            _, pending = concurrent.futures.wait(futures, timeout=None if remaining == float("inf") else
                                                 max(remaining, 0.0))
            if pending:
                failed.set()
                raise TimeoutError("the remote call passed its deadline (remote.timeout_ms)")
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise


class _Skipped(Exception):
    """An item of a batch that was not tried because an earlier one failed."""


def open_tier(url: str, options: RemoteOptions) -> RemoteTier:
    """Registry entry for ``s3://bucket[/prefix]``."""
    rest = url.partition("://")[2]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError("remote.url", f"{mask_url(url)!r} names no bucket (expected s3://bucket[/prefix])")
    return S3Tier(bucket, prefix.strip("/"), options)


def _make_client(options: RemoteOptions) -> BaseClient:
    config = Config(
        connect_timeout=options.timeout_s, read_timeout=options.timeout_s,
        retries={"total_max_attempts": 1}, max_pool_connections=_NUM_THREADS,
        s3={"addressing_style": "path" if options.s3_endpoint else "auto"},
        request_checksum_calculation="when_required", response_checksum_validation="when_required")
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=options.s3_endpoint, region_name=options.s3_region,
                            aws_access_key_id=options.access_key, aws_secret_access_key=options.secret_key,
                            verify=options.tls_ca if options.tls_ca else True, config=config)
    if options.tls_ca or options.tls_cert:
        _use_one_tls_context(client, options)
    return client


class _OneContextSession(URLLib3Session):
    """botocore's HTTP session with every TLS setting in one ``SSLContext`` loaded up front.

    Given a CA file or a client certificate, urllib3 loads them into the pool's shared context
    again on every new connection. With several connections opening at once (our thread pool),
    ``load_cert_chain`` then races with handshakes in other threads, which can crash CPython
    before 3.13 (python/cpython#134698, seen here as a segfault). Loaded once, nothing changes the
    context after it is shared; certificate and host-name checks are urllib3's as before.
    """

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self._one_context = context
        super().__init__(timeout=timeout, max_pool_connections=_NUM_THREADS,
                         socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

    def _get_ssl_context(self) -> ssl.SSLContext:
        return self._one_context

    def _setup_ssl_cert(self, conn: object, url: str, verify: object) -> None:
        conn.cert_reqs = "CERT_REQUIRED"  # type: ignore[attr-defined]
        conn.ca_certs = None  # type: ignore[attr-defined]  # already in the context


def _use_one_tls_context(client: BaseClient, options: RemoteOptions) -> None:
    """Give ``client`` a ``_OneContextSession`` holding the configured CA (else the system's) and
    client certificate. Raises ``ConfigError`` when they cannot be loaded."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    try:
        if options.tls_ca:
            context.load_verify_locations(cafile=options.tls_ca)
        else:
            context.load_default_certs()
        if options.tls_cert and options.tls_key:
            context.load_cert_chain(options.tls_cert, options.tls_key)
    except (ssl.SSLError, OSError) as exc:
        key = "remote.tls_cert" if options.tls_cert else "remote.tls_ca"
        raise ConfigError(key, f"cannot load the TLS files: {exc}") from None
    endpoint = client._endpoint  # botocore has no public hook for the HTTP session
    previous = endpoint.http_session
    endpoint.http_session = _OneContextSession(context, options.timeout_s)
    previous.close()


def _age_s(response: dict[str, object]) -> float:
    """An object's age by the server's clock: the response's Date less its Last-Modified."""
    headers = response["ResponseMetadata"]["HTTPHeaders"]  # type: ignore[index]
    now = email.utils.parsedate_to_datetime(headers["date"]) if "date" in headers else datetime.now(timezone.utc)
    modified = response["LastModified"]
    assert isinstance(modified, datetime)
    return (now - modified).total_seconds()


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code", exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))


class _DeadlineBody(io.BytesIO):
    """A request body that botocore reads in pieces, each checking the call's deadline."""

    def __init__(self, value: bytes, deadline: CallDeadline) -> None:
        super().__init__(value)
        self._deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        self._deadline.check()
        return super().read(_BODY_PIECE_BYTES if size is None or size < 0 else min(size, _BODY_PIECE_BYTES))


def _read_exact(body: object, out: memoryview, deadline: CallDeadline, timeout_s: float) -> None:
    """Fill ``out`` from a streaming body in pieces, each checking ``deadline``, its socket
    waiting at most ``timeout_s`` or what is left (botocore raises IncompleteReadError when it
    ends early)."""
    num_read = 0
    while num_read < out.nbytes:
        body.set_socket_timeout(min(deadline.check(), timeout_s))  # type: ignore[attr-defined]
        got = body.readinto(out[num_read:num_read + _BODY_PIECE_BYTES])  # type: ignore[attr-defined]
        if not got:
            raise urllib3.exceptions.ProtocolError(f"body ended after {num_read} of {out.nbytes} bytes")
        num_read += got
