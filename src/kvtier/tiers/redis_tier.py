"""Redis and Valkey remote tier (redis-py is imported only here). Contract: ``tiers/remote.py``.

URLs: ``redis://[user[:password]@]host[:port][/db]``, ``rediss://...`` (TLS, CA from ``tls_ca``),
``redis+cluster://[user[:password]@]host:port,host:port`` and ``rediss+cluster://...`` (Redis
Cluster; the listed nodes are seeds, the client discovers the rest). ``username``/``password``
options, when given, win over the URL's.

Data path: one value per entry, written with ``SET name value NX [EX ttl_s]`` (an existing value
is neither overwritten nor has its TTL refreshed) and read with pipelined EXISTS and bounded
GETRANGEs (never more than one byte past an entry's size), in groups of about 16 MiB per round trip. Large values travel without joining or copying on the client side:
a custom command packer sends header and payload as separate buffers of one bulk string (redis-py's
hiredis packer copies every command into one buffer, which makes a 6 MB SET about 3x slower).
Deadlines: every call of the tier is bounded as a whole by ``timeout_s`` (``CallDeadline``):
each connection's socket is wrapped so that connecting and every send and receive get only what
is left of the call's deadline (a value trickling in over a slow link is given up at the
deadline, not after ``timeout_s`` per read). redis-py's own retries are off.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from kvtier.entry import HEADER_BYTES
from kvtier.config import mask_url
from kvtier.errors import ConfigError
from kvtier.tiers.remote import CallDeadline, Fetched, RemoteOptions, RemoteTier

logger = logging.getLogger(__name__)

_DELETE_BATCH = 500  # names per DEL of a namespace delete
_BATCH_BYTES = 16 << 20  # one pipelined round trip fetches about this much
_DEFAULT_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect, parsed from a URL plus options."""

    nodes: tuple[tuple[str, int], ...]
    db: int
    tls: bool
    cluster: bool
    username: str | None
    password: str | None

    def describe(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        return f"{scheme}://{','.join(f'{host}:{port}' for host, port in self.nodes)}/{self.db}"


def parse_url(url: str, options: RemoteOptions) -> RedisTarget:
    """Parse a redis URL (see the module docstring); ``ConfigError("remote.url", ...)`` if malformed."""
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = tuple(_parse_node(url, node) for node in hosts.split(",") if node)
    cluster = scheme.endswith("+cluster")
    if not nodes or (len(nodes) > 1 and not cluster):
        raise ConfigError("remote.url", f"{mask_url(url)} must name one host (several only with +cluster)")
    if not path.isdigit() and path != "":
        raise ConfigError("remote.url", f"{mask_url(url)}: the path must be a database number")
    db = int(path or 0)
    if cluster and db != 0:
        raise ConfigError("remote.url", f"{mask_url(url)}: Redis Cluster has only database 0")
    return RedisTarget(nodes, db, scheme.startswith("rediss"), cluster,
                       options.username or user or None, options.password or password or None)


class RedisTier(RemoteTier):
    """A Redis/Valkey server or cluster holding entries under ``kvtier/<key>.<rank>``."""

    io_errors = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)

    def __init__(self, target: RedisTarget, options: RemoteOptions) -> None:
        """Connects at once; an unreachable server leaves the tier unhealthy (no exception)."""
        super().__init__(target.describe(), options.timeout_s, options.sealer, options.codec)
        self.target = target
        self.ttl_s = options.ttl_s
        self._tls_ca = options.tls_ca
        self._tls_cert, self._tls_key = options.tls_cert, options.tls_key
        self._client: redis.Redis | RedisCluster | None = None
        self._start()

    def _connect(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        self._client.ping()

    def _make_client(self) -> redis.Redis | RedisCluster:
        base = _SSLConnection if self.target.tls else _Connection
        # a class per tier: redis-py (and RedisCluster's per-node pools) pass no extra arguments on
        connection_class = type(base.__name__, (base,), {"deadline": self.deadline})
        tls = {"ssl_ca_certs": self._tls_ca, "ssl_certfile": self._tls_cert, "ssl_keyfile": self._tls_key} \
            if self.target.tls else {}
        no_retry = Retry(NoBackoff(), 0)
        host, port = self.target.nodes[0]
        if self.target.cluster:
            # redis-py hands connection_class to the nodes' pools only for a client built from a
            # URL; the URL is plain redis:// because TLS comes with the connection class.
            seeds = [ClusterNode(*node) for node in self.target.nodes[1:]]
            return RedisCluster(url=f"redis://{host}:{port}", startup_nodes=seeds, retry=no_retry,
                                connection_class=connection_class, username=self.target.username,
                                password=self.target.password, socket_timeout=self.timeout_s,
                                socket_connect_timeout=self.timeout_s, **tls)
        pool = redis.ConnectionPool(connection_class=connection_class, host=host, port=port, db=self.target.db,
                                    retry=no_retry, username=self.target.username, password=self.target.password,
                                    socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                                    **tls)
        return redis.Redis(connection_pool=pool)

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The redis-py client (connected); for tests and benchmarks."""
        assert self._client is not None, "the tier has not connected yet"
        return self._client

    def _count_prefix(self, names: Sequence[str], max_age_s: int) -> int:  # Redis expires entries itself
        return len(self._prefix_ages(names, max_age_s))

    def _prefix_ages(self, names: Sequence[str], max_age_s: int) -> list[float]:
        """One pipelined PTTL per name (-2: absent). Redis keeps no write time: an entry's age is
        the TTL it was written with (``put``: the shorter of the tier's and the namespace's,
        ``max_age_s``) less what is left of it; 0.0 for one without expiry."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.pttl(name)
        written_ttls = [ttl for ttl in (self.ttl_s, max_age_s) if ttl]
        written_ttl_s = min(written_ttls) if written_ttls else 0
        ages: list[float] = []
        for left_ms in pipe.execute():
            if left_ms == -2:
                break
            ages.append(max(0.0, written_ttl_s - left_ms / 1000) if left_ms >= 0 and written_ttl_s else 0.0)
        return ages

    def _fetch_many(self, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        """Per name, EXISTS and a bounded GETRANGE (at most one byte more than an entry can be, so
        a huge value planted under an entry's name is never read whole); a value of another type
        (WRONGTYPE) is one bad entry, not a failed batch."""
        fetched: list[Fetched | None] = []
        for group in _groups(items, _BATCH_BYTES):
            pipe = self.client.pipeline(transaction=False)
            for name, out in group:
                pipe.exists(name)
                pipe.getrange(name, 0, HEADER_BYTES + out.nbytes)
            replies = pipe.execute(raise_on_error=False)
            for (_, out), exists, value in zip(group, replies[0::2], replies[1::2]):
                if isinstance(exists, Exception):
                    raise exists
                if not exists:
                    fetched.append(None)
                elif isinstance(value, redis.ResponseError):  # not a string: a bad entry (deleted, counted)
                    fetched.append(Fetched(b"", 0))
                elif isinstance(value, Exception):
                    raise value
                else:
                    fetched.append(_place(value, out))
        return fetched

    @property
    def default_ttl_s(self) -> int | None:
        return self.ttl_s

    def _put_new(self, name: str, header: bytes, payload: memoryview, ttl_s: int | None) -> bool:
        # Returns True (set) or None (exists): both mean the value is there.
        self.client.set(name, _Joined((memoryview(header), payload)), nx=True, ex=ttl_s)  # type: ignore[arg-type]
        return True

    def _delete_many(self, names: Sequence[str]) -> int:
        return int(self.client.delete(*names))

    def _delete_prefix(self, prefix: str) -> int:
        # SCAN (on every primary of a cluster) with a glob of the prefix: namespaces hold no glob
        # characters. Deleted in batches as found; a key written meanwhile may survive.
        removed = 0
        batch: list[bytes] = []
        for name in self.client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(name)
            if len(batch) >= _DELETE_BATCH:
                removed += self._delete_many([n.decode() for n in batch])
                batch = []
        if batch:
            removed += self._delete_many([n.decode() for n in batch])
        return removed

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()


def open_tier(url: str, options: RemoteOptions) -> RemoteTier:
    """Registry entry for ``redis://``, ``rediss://``, ``redis+cluster://``, ``rediss+cluster://``."""
    return RedisTier(parse_url(url, options), options)


@dataclass(frozen=True)
class _Joined:
    """One Redis value sent as several buffers (entry header, payload) without joining them."""

    parts: tuple[memoryview, ...]


class _Packer(PythonRespSerializer):
    """redis-py's pure-Python RESP packer (keeps large arguments as separate chunks, no copy),
    plus ``_Joined`` values: one bulk string whose bytes come from several buffers."""

    def pack(self, *args: object) -> list[bytes | memoryview]:
        if not any(isinstance(arg, _Joined) for arg in args):
            return super().pack(*args)  # type: ignore[no-any-return]
        small = bytearray(b"*%d\r\n" % len(args))
        output: list[bytes | memoryview] = []
        for arg in args:
            parts = arg.parts if isinstance(arg, _Joined) else (memoryview(self.encode(arg)),)
            small += b"$%d\r\n" % sum(part.nbytes for part in parts)
            for part in parts:
                if part.nbytes > self._buffer_cutoff:
                    output.extend((bytes(small), part))
                    small = bytearray()
                else:
                    small += part
            small += b"\r\n"
        output.append(bytes(small))
        return output


class _PackerMixin:
    """Connection mixin: use ``_Packer`` (whatever parser redis-py picks, hiredis included)."""

    _buffer_cutoff: int
    encoder: redis.connection.Encoder

    def _construct_command_packer(self, packer: object) -> _Packer:
        return _Packer(self._buffer_cutoff, self.encoder.encode)


class _DeadlineMixin:
    """Connection mixin: connect within what is left of the tier's ``CallDeadline`` and wrap the
    socket in a ``_DeadlineSocket``. ``deadline`` is set on a subclass per tier."""

    deadline: CallDeadline
    socket_timeout: float | None
    socket_connect_timeout: float | None

    def _connect(self) -> socket.socket:
        base_timeout = self.socket_connect_timeout
        remaining = self.deadline.check()
        if remaining != math.inf:
            self.socket_connect_timeout = remaining if base_timeout is None else min(base_timeout, remaining)
        try:
            sock = super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout = base_timeout
        return _DeadlineSocket(sock, self.deadline, self.socket_timeout)  # type: ignore[return-value]


class _DeadlineSocket:
    """A socket whose every send and receive is given at most what is left of the call's
    deadline (and never more than the timeout redis-py asked for: 0 stays non-blocking).
    Everything else is the socket's own."""

    def __init__(self, sock: socket.socket, deadline: CallDeadline, timeout_s: float | None) -> None:
        self._sock = sock
        self._deadline = deadline
        self._requested = timeout_s

    def settimeout(self, timeout_s: float | None) -> None:
        self._requested = timeout_s
        self._sock.settimeout(timeout_s)

    def recv(self, size: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(size, flags)

    def recv_into(self, buffer: memoryview | bytearray, size: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, size, flags)

    def sendall(self, data: bytes | memoryview, flags: int = 0) -> None:
        self._arm()  # sendall's timeout bounds the whole send (Python >= 3.5)
        self._sock.sendall(data, flags)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)

    def _arm(self) -> None:
        remaining = self._deadline.remaining_s()
        if remaining <= 0:
            raise socket.timeout("the remote call passed its deadline (remote.timeout_ms)")
        requested = math.inf if self._requested is None else self._requested
        timeout_s = min(requested, remaining)
        self._sock.settimeout(None if timeout_s == math.inf else timeout_s)


class _Connection(_DeadlineMixin, _PackerMixin, redis.Connection):
    pass


class _SSLConnection(_DeadlineMixin, _PackerMixin, redis.SSLConnection):
    pass


def _place(value: bytes | None, out: memoryview) -> Fetched | None:
    """Copy the payload of ``value`` into the start of ``out`` when it fits."""
    if value is None:
        return None
    view = memoryview(value)
    if HEADER_BYTES <= view.nbytes <= HEADER_BYTES + out.nbytes:
        out[:view.nbytes - HEADER_BYTES] = view[HEADER_BYTES:]
    return Fetched(bytes(view[:HEADER_BYTES]), view.nbytes)


def _groups(items: Sequence[tuple[str, memoryview]], batch_bytes: int) -> Iterator[Sequence[tuple[str, memoryview]]]:
    """Consecutive slices of ``items`` of at most about ``batch_bytes`` expected bytes (at least one item)."""
    start, num_bytes = 0, 0
    for index, (_, out) in enumerate(items):
        if index > start and num_bytes + out.nbytes > batch_bytes:
            yield items[start:index]
            start, num_bytes = index, 0
        num_bytes += out.nbytes
    if start < len(items):
        yield items[start:]


def _parse_node(url: str, node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":") if ":" in node else (node, "", str(_DEFAULT_PORT))
    if not host or not port.isdigit():
        raise ConfigError("remote.url", f"{mask_url(url)}: bad host:port {node!r}")
    return host, int(port)
