"""The peer server: answers other kvtier instances' lookups and fetches from this instance's tiers.

Under vLLM it runs in a process of its own (``peer_process``, started by the worker of rank 0:
``integrations/vllm/peers.serve_peers``) that reads the disk tier's files, so that answering peers
never waits on the engine; tests also run it in-process. On background threads: one accepting,
one per connection (at most ``MAX_CONNECTIONS`` authenticated ones, and ``MAX_HANDSHAKES`` still
proving the secret: a connection beyond those drops the oldest that has not, so connections that
never authenticate cannot lock peers out), each leaving the engine's CPU binding (``io_threads``). Every
connection must pass the HMAC handshake (``peer_wire``) before it may ask anything; a client that
fails it, or later sends anything malformed, is disconnected. A request names entries by tenant
namespace, key and rank, and the server answers only from its ``EntrySource`` (the entries its
tiers hold under that namespace): it never lists, writes or deletes anything.

It sends entries as stored (header + payload, sealed where the tier seals); it does not verify
them: every client verifies every entry it receives, as it does for Redis or S3.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import threading
import time
from collections import OrderedDict

from kvtier.tiers.disk import entry_path
from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.peer_wire import OP_LOOKUP, EntryName, ProtocolError, encode_ages, read_request, \
    server_handshake, value_head

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # authenticated connections
MAX_HANDSHAKES = 8  # connections still proving the secret; a new one beyond these drops the oldest
HANDSHAKE_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 300.0  # a connection with no request for this long is closed


class EntrySource(abc.ABC):
    """What a peer server may serve: the entries this instance's tiers hold. Called from the
    server's connection threads, concurrently; must never block on the engine."""

    @abc.abstractmethod
    def age_s(self, entry: EntryName) -> float | None:
        """Seconds since ``entry`` was written, or None when not held."""

    @abc.abstractmethod
    def read(self, entry: EntryName, most_bytes: int) -> bytes | None:
        """The stored value of ``entry`` (header + payload), or None when not held or longer
        than ``most_bytes``."""


class DiskSource(EntrySource):
    """The disk tier's entry files under ``root`` (``DiskFiles.root``). A file is whole once
    visible (written aside, then renamed); one removed while being read is still read whole (the
    descriptor keeps it). Only reads: it never creates, writes or removes anything."""

    def __init__(self, root: str) -> None:
        self.root = root

    def age_s(self, entry: EntryName) -> float | None:
        try:
            stat = os.stat(entry_path(self.root, entry.key, entry.rank, entry.namespace))
        except OSError:
            return None
        return max(0.0, time.time() - stat.st_mtime)

    def read(self, entry: EntryName, most_bytes: int) -> bytes | None:
        try:
            fd = os.open(entry_path(self.root, entry.key, entry.rank, entry.namespace), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > most_bytes:
                return None
            return os.pread(fd, size, 0)
        except OSError:
            return None
        finally:
            os.close(fd)


class PeerServer:
    """A TCP server on ``(host, port)`` (port 0: any free one, see ``port``) answering
    authenticated peers from ``source``."""

    def __init__(self, host: str, port: int, secret: bytes, source: EntrySource, advertised: str | None) -> None:
        """Binds at once; ``OSError`` when the address is taken or not local. ``advertised``: the
        ``host:port`` peers dial (``p2p.advertise``); clients that dialled another address are
        refused (``peer_wire``: a relay). None: ``host`` and the bound port."""
        self._secret = secret
        self._source = source
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.5)
        self.port: int = self._listener.getsockname()[1]
        self.advertised = advertised or f"{host}:{self.port}"
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._handshaking: OrderedDict[socket.socket, None] = OrderedDict()  # oldest first, under _lock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.num_entries_served = 0
        self.num_bytes_served = 0
        self.num_lookups = 0
        self.num_refused = 0  # clients that failed the handshake or broke the protocol
        self._thread = threading.Thread(target=self._accept_loop, name="kvtier-peer-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and drop every connection. Idempotent."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                _shutdown_quietly(conn)

    def _accept_loop(self) -> None:
        unbind_this_thread()  # its connection threads inherit this
        while not self._stop.is_set():
            try:
                conn, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with self._lock:  # connections that never prove the secret cannot hold the server
                self._handshaking[conn] = None
                if len(self._handshaking) > MAX_HANDSHAKES:
                    oldest, _ = self._handshaking.popitem(last=False)
                    _shutdown_quietly(oldest)
            threading.Thread(target=self._serve, args=(conn, address), name="kvtier-peer-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, address: object) -> None:
        slot = False
        with self._lock:
            self._connections.add(conn)
        try:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                server_handshake(conn, self._secret, self.advertised)
            finally:
                with self._lock:
                    self._handshaking.pop(conn, None)
            slot = self._slots.acquire(blocking=False)
            if not slot:
                logger.warning("kvtier: peer server has %d connections; refusing %s", MAX_CONNECTIONS, address)
                return
            conn.settimeout(IDLE_TIMEOUT_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stop.is_set() and self._answer(conn):
                pass
        except ProtocolError as exc:
            with self._lock:
                self.num_refused += 1
            logger.warning("kvtier: peer server dropped %s: %s", address, exc)
        except OSError as exc:
            logger.debug("kvtier: peer connection %s ended: %s", address, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()
            if slot:
                self._slots.release()

    def _answer(self, conn: socket.socket) -> bool:
        """Answer one request; False when the client closed the connection."""
        request = read_request(conn)
        if request is None:
            return False
        if request.op == OP_LOOKUP:
            ages: list[float] = []
            for entry in request.names:
                age = self._source.age_s(entry)
                if age is None:
                    break
                ages.append(age)
            conn.sendall(encode_ages(ages))
            with self._lock:
                self.num_lookups += 1
            return True
        for entry, most in zip(request.names, request.most_bytes):
            value = self._source.read(entry, most)
            conn.sendall(value_head(None if value is None else len(value)))
            if value is not None:
                conn.sendall(value)
                with self._lock:
                    self.num_entries_served += 1
                    self.num_bytes_served += len(value)
        return True


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
