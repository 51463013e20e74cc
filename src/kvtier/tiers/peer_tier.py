"""The peer tier: the ``RemoteTier`` contract (``tiers/remote.py``) over other kvtier instances.

Lookups ask every known peer how many consecutive entries from the start it holds and take the
longest answer; fetches ask the peers in turn for what is still missing. Writes upload nothing
(``stores_uploads`` is False: each instance's own memory and disk keep its entries, and serve them
through its ``peer_server``), and deletes remove nothing (a peer's entries are its own).

Peers come from a static list (``p2p.peers``) and/or a Redis registry (``p2p.registry``,
``peer_registry``), read every ``REGISTRY_REFRESH_S`` on a thread of its own; the instance's own
address is left out. Every value is verified by the base class exactly as a Redis value is (header: key,
rank, layout, length, checksum; sealed values authenticate), so a peer can cost misses, never
wrong KV. A peer that fails (refuses the handshake, dies, times out, sends garbage) is skipped for
a backoff of 1 s doubling to 30 s while the others still answer; the tier as a whole is marked
unhealthy only when every peer it asked failed.

The transport sits behind ``PeerTransport`` (one method per request kind, addresses and names
only), so a NIXL/UCX transport could replace ``TcpTransport`` without touching the tier.
"""

from __future__ import annotations

import abc
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvtier.compression import KVCodec
from kvtier.configparts.values import check_address
from kvtier.crypto import Sealer
from kvtier.entry import HEADER_BYTES
from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.peer_wire import MAX_NAMES, ProtocolError, Stream, canonical_address, client_handshake, \
    encode_fetch, encode_lookup, read_ages, read_value_length, recv_into_exact
from kvtier.tiers.remote import FIRST_BACKOFF_S, MAX_BACKOFF_S, CallDeadline, Fetched, RemoteTier

logger = logging.getLogger(__name__)

REGISTRY_REFRESH_S = 1.0

_T = TypeVar("_T")


class PeerTransport(abc.ABC):
    """Moves requests and entries between this instance and one peer at a time. Called by one
    thread at a time; may raise ``OSError`` (``ProtocolError`` for garbage) on any failure, after
    which the connection to that peer is dropped."""

    @abc.abstractmethod
    def prefix_ages(self, address: str, names: Sequence[str]) -> list[float]:
        """The ages of the consecutive ``names`` from the start that the peer holds."""

    @abc.abstractmethod
    def fetch(self, address: str, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        """``RemoteTier._fetch_many``'s answer from one peer."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop every connection."""


class TcpTransport(PeerTransport):
    """The wire protocol of ``peer_wire`` on one TCP connection per peer (authenticated once,
    reused), every blocking operation bounded by what is left of the tier's ``CallDeadline``."""

    def __init__(self, secret: bytes, deadline: CallDeadline, timeout_s: float) -> None:
        self._secret = secret
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._connections: dict[str, socket.socket] = {}

    def prefix_ages(self, address: str, names: Sequence[str]) -> list[float]:
        ages: list[float] = []
        for start in range(0, len(names), MAX_NAMES):  # the server takes at most MAX_NAMES per request
            batch = names[start:start + MAX_NAMES]
            found = self._exchange(address, lambda sock: self._lookup(sock, batch))
            ages += found
            if len(found) < len(batch):
                break
        return ages

    def fetch(self, address: str, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        found: list[Fetched | None] = []
        for start in range(0, len(items), MAX_NAMES):
            batch = items[start:start + MAX_NAMES]
            found += self._exchange(address, lambda sock: self._fetch(sock, batch))
        return found

    def _lookup(self, sock: Stream, names: Sequence[str]) -> list[float]:
        sock.sendall(encode_lookup(names))
        return read_ages(sock, len(names))

    def _fetch(self, sock: Stream, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        most = [HEADER_BYTES + out.nbytes for _, out in items]
        sock.sendall(encode_fetch([name for name, _ in items], most))
        return [self._read_value(sock, out, most_bytes) for (_, out), most_bytes in zip(items, most)]

    def _exchange(self, address: str, request: Callable[[Stream], _T]) -> _T:
        """``request`` on the connection to ``address``. A kept connection the peer has closed
        meanwhile (it drops idle ones) fails at once: that one is retried on a new connection.
        Lookups and fetches only read, so running one again is harmless."""
        reused = address in self._connections
        try:
            with self._request(address) as sock:
                return request(sock)
        except TimeoutError:
            raise
        except OSError:
            if not reused:
                raise
        with self._request(address) as sock:
            return request(sock)

    def _read_value(self, sock: Stream, out: memoryview, most_bytes: int) -> Fetched | None:
        length = read_value_length(sock, most_bytes)
        if length is None:
            return None
        header = bytearray(min(length, HEADER_BYTES))
        recv_into_exact(sock, memoryview(header))
        if length > HEADER_BYTES:
            recv_into_exact(sock, out[:length - HEADER_BYTES])
        return Fetched(bytes(header), length)

    def _request(self, address: str) -> "_Exchange":
        sock = self._connections.get(address)
        if sock is None:
            sock = self._connect(address)
            self._connections[address] = sock
        return _Exchange(self, address, _DeadlineStream(sock, self._budget))

    def _connect(self, address: str) -> socket.socket:
        try:
            host, port = check_address(address)  # [::1]:7001 -> ("::1", 7001)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        sock = socket.create_connection((host, port), timeout=self._budget())
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_handshake(_DeadlineStream(sock, self._budget), self._secret, address)
        except OSError:
            sock.close()
            raise
        return sock

    def _budget(self) -> float:
        """Seconds the next blocking operation may take: what is left of the call's deadline;
        ``TimeoutError`` once it has passed."""
        return min(self._deadline.check(), self._timeout_s)

    def drop(self, address: str) -> None:
        sock = self._connections.pop(address, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for address in list(self._connections):
            self.drop(address)


class _DeadlineStream:
    """A socket whose every send and receive gets only what is left of the call's deadline, so a
    peer trickling bytes is given up at the deadline, not after a timeout per receive."""

    def __init__(self, sock: socket.socket, budget: Callable[[], float]) -> None:
        self._sock = sock
        self._budget = budget

    def recv(self, size: int) -> bytes:
        self._sock.settimeout(self._budget())
        return self._sock.recv(size)

    def recv_into(self, buffer: memoryview) -> int:
        self._sock.settimeout(self._budget())
        return self._sock.recv_into(buffer)

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._budget())
        self._sock.sendall(data)


class _Exchange:
    """One request on a connection: an exception inside drops the connection (its stream is in an
    unknown state), so the next request reconnects."""

    def __init__(self, transport: TcpTransport, address: str, stream: _DeadlineStream) -> None:
        self._transport, self._address, self._stream = transport, address, stream

    def __enter__(self) -> _DeadlineStream:
        return self._stream

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None:
            self._transport.drop(self._address)


class PeerDirectory(abc.ABC):
    """Where the peers are."""

    @abc.abstractmethod
    def addresses(self) -> list[str]:
        """The peers to ask, as ``host:port`` (never this instance's own address)."""

    def close(self) -> None:
        """Release resources (a registry client)."""


class StaticPeers(PeerDirectory):
    def __init__(self, peers: Sequence[str], own_address: str | None) -> None:
        self._peers = [peer for peer in peers if peer != own_address]

    def addresses(self) -> list[str]:
        return list(self._peers)


class RegistryPeers(PeerDirectory):
    """A static list plus the addresses registered in Redis (``peer_registry``), refreshed every
    ``REGISTRY_REFRESH_S`` on a thread of its own, so that a slow or stalled registry never holds
    up a lookup; a registry that fails keeps the last list it gave. Entries that are not
    ``host:port`` are dropped (anyone who can write the registry can write anything there)."""

    def __init__(self, url: str, static: Sequence[str], own_address: str | None, timeout_s: float) -> None:
        from kvtier.tiers.peer_registry import PeerRegistry

        self._registry = PeerRegistry(url, timeout_s)
        self._static = list(static)
        self._own = own_address
        self._found: list[str] = []
        self._refreshed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-peer-registry", daemon=True)
        self._thread.start()
        self._refreshed.wait(timeout_s)  # the first answer, if the registry gives it in time

    def addresses(self) -> list[str]:
        merged = dict.fromkeys(self._static + self._found)
        return [address for address in merged if address != self._own]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._registry.close()

    def _run(self) -> None:
        unbind_this_thread()
        while not self._stop.is_set():
            try:
                self._found = [address for address in self._registry.addresses() if _is_address(address)]
            except Exception as exc:  # redis-py's errors: the registry is a hint, never a failure
                logger.debug("kvtier: peer registry: %s", exc)
            self._refreshed.set()
            self._stop.wait(REGISTRY_REFRESH_S)


def _is_address(address: str) -> bool:
    try:
        check_address(address)
        canonical_address(address)
    except ValueError:
        return False
    return True


class PeerTier(RemoteTier):
    """Other kvtier instances as a remote tier; see the module docstring."""

    stores_uploads = False

    def __init__(self, directory: PeerDirectory, secret: bytes, timeout_s: float, sealer: Sealer | None = None,
                 codec: KVCodec | None = None, transport: PeerTransport | None = None) -> None:
        super().__init__("peers", timeout_s, sealer, codec)
        self.directory = directory
        self.transport = transport or TcpTransport(secret, self.deadline, timeout_s)
        self._down_until: dict[str, float] = {}  # address -> monotonic time of its next try
        self._peer_backoff_s: dict[str, float] = {}
        self.num_peer_failures = 0
        self._start()

    def _connect(self) -> None:
        pass  # connections are per peer, made on first use

    def _live_peers(self) -> list[str]:
        now = time.monotonic()
        return [address for address in self.directory.addresses() if self._down_until.get(address, 0.0) <= now]

    def _peer_failed(self, address: str, exc: OSError) -> None:
        self.num_peer_failures += 1
        backoff = min(self._peer_backoff_s.get(address, FIRST_BACKOFF_S / 2) * 2, MAX_BACKOFF_S)
        self._peer_backoff_s[address] = backoff
        self._down_until[address] = time.monotonic() + backoff
        logger.warning("kvtier: peer %s failed (%s: %s); skipped for %.0f s", address, type(exc).__name__, exc,
                       backoff)

    def _peer_answered(self, address: str) -> None:
        self._peer_backoff_s.pop(address, None)
        self._down_until.pop(address, None)

    def _count_prefix(self, names: Sequence[str], max_age_s: int) -> int:
        return len(self._prefix_ages(names, max_age_s))

    def _prefix_ages(self, names: Sequence[str], max_age_s: int) -> list[float]:
        """The longest run any peer holds; entries older than ``max_age_s`` (if set) end it."""
        best: list[float] = []
        failure: OSError | None = None
        answered = 0
        for address in self._live_peers():
            if self.deadline.remaining_s() <= 0:
                failure = None  # the peers not asked are not to blame: a miss, the tier stays healthy
                break
            try:
                ages = self.transport.prefix_ages(address, names)
            except OSError as exc:
                self._peer_failed(address, exc)
                failure = exc
                continue
            answered += 1
            self._peer_answered(address)
            if max_age_s:
                ages = ages[:next((i for i, age in enumerate(ages) if age > max_age_s), len(ages))]
            if len(ages) > len(best):
                best = ages
            if len(best) == len(names):
                break
        if failure is not None and not answered:
            raise failure  # every peer asked failed: the tier backs off as for a dead Redis
        return best

    def _fetch_many(self, items: Sequence[tuple[str, memoryview]]) -> list[Fetched | None]:
        """Each peer in turn for the names still missing. A peer that fails mid-answer leaves its
        names missing (its partial bytes are never reported as found)."""
        found: list[Fetched | None] = [None] * len(items)
        failure: OSError | None = None
        answered = 0
        for address in self._live_peers():
            missing = [index for index, value in enumerate(found) if value is None]
            if not missing:
                break
            if self.deadline.remaining_s() <= 0:
                failure = None  # the peers not asked are not to blame: a miss, the tier stays healthy
                break
            try:
                answer = self.transport.fetch(address, [items[index] for index in missing])
            except OSError as exc:
                self._peer_failed(address, exc)
                failure = exc
                continue
            answered += 1
            self._peer_answered(address)
            for index, value in zip(missing, answer):
                found[index] = value
        if failure is not None and not answered:
            raise failure
        return found

    def _put_new(self, name: str, header: bytes, payload: memoryview, ttl_s: int | None) -> bool:
        return False  # never called: stores_uploads is False, the local tiers keep the entries

    def _delete_many(self, names: Sequence[str]) -> int:
        return 0  # a peer's entries are its own

    def _delete_prefix(self, prefix: str) -> int:
        return 0

    def _close(self) -> None:
        self.transport.close()
        self.directory.close()

