"""The peer-to-peer wire protocol: mutual HMAC authentication, then lookups and fetches of entries.

Transport: one TCP connection, any number of requests on it, one at a time. Pure functions over a
socket; both ends (``peer_tier.TcpTransport``, ``peer_server.PeerServer``) use them.

Handshake (both ends prove they hold the shared secret; nothing else is sent before it passes):
  server -> client  MAGIC, nonce_s (32 random bytes)
  client -> server  MAGIC, nonce_c (32 random bytes), u16 length, dialled,
                    HMAC-SHA256(secret, "kvtier-p2p client" nonce_s nonce_c dialled)
  server -> client  HMAC-SHA256(secret, "kvtier-p2p server" nonce_c nonce_s dialled)
``dialled`` is the ``host:port`` the client connected to (``canonical_address``). The server
accepts it only when it is its own advertised address: without that check, anyone who can list an
address of its own (the peer registry on Redis is not trusted) could relay a client's handshake to
a real server and then send requests of its own on the authenticated connection. A server that
gets a wrong MAC or another address closes the connection without answering; a client that gets a
wrong MAC closes it (``AuthError``). Fresh nonces on both sides: a recorded handshake cannot be
replayed.

Requests: ``u32 body bytes, u8 op, body`` (little endian). Names are the remote tier's object
names, ``kvtier/<namespace>/<32 hex key>.<rank>``, so the tenant namespace is in every request.
  LOOKUP body: u32 n, n x (u16 length, name)            answer: u32 count, count x f64 age_s
  FETCH body:  u32 n, n x (u16 length, name, u64 most)  answer: n x (u64 length or ABSENT, value bytes)
A LOOKUP answer is the run of consecutive names from the start that the server holds, with each
entry's age. A FETCH value is an entry as stored (header + payload), never longer than the ``most``
the client asked for. Anything else (a count or length out of range, a short read, a closed
connection) is a ``ProtocolError``: the client drops the connection and counts a miss.
"""

from __future__ import annotations

import hmac
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvtier.configparts.values import is_namespace

MAGIC = b"KVP2"  # KVP1 had no dialled address in its handshake
NONCE_BYTES = 32
MAC_BYTES = 32
OP_LOOKUP = 1
OP_FETCH = 2
ABSENT = 2**64 - 1
MAX_NAMES = 4096  # names in one request
MAX_REQUEST_BYTES = 1 << 20
MAX_NAME_BYTES = 200
MAX_ADDRESS_BYTES = 300
_NAME = re.compile(r"kvtier/([^/]{1,64})/([0-9a-f]{32})\.([0-9]{1,4})")
_CLIENT_LABEL = b"kvtier-p2p client"
_SERVER_LABEL = b"kvtier-p2p server"


class ProtocolError(OSError):
    """The other end broke the protocol (garbage, a short answer, a closed connection): an I/O
    failure, so at a tier boundary a miss."""


class AuthError(ProtocolError):
    """The other end does not hold the shared secret (or is not a kvtier peer)."""


@dataclass(frozen=True)
class EntryName:
    """A parsed object name: which entry of which tenant a request names."""

    namespace: str
    key: bytes
    rank: int


def parse_name(name: str) -> EntryName:
    """The entry ``name`` names; ``ProtocolError`` for anything that is not an entry name."""
    match = _NAME.fullmatch(name)
    if match is None or not is_namespace(match.group(1)):
        raise ProtocolError(f"not an entry name: {name[:80]!r}")
    return EntryName(match.group(1), bytes.fromhex(match.group(2)), int(match.group(3)))


# ---------------------------------------------------------------------------- socket helpers

class Stream(Protocol):
    """What the protocol needs of a connection: a socket, or a wrapper bounding each call."""

    def recv(self, size: int) -> bytes: ...

    def recv_into(self, buffer: memoryview) -> int: ...

    def sendall(self, data: bytes) -> None: ...


def recv_exact(sock: Stream, num_bytes: int) -> bytes:
    """Exactly ``num_bytes`` bytes; ``ProtocolError`` if the connection ends first."""
    buffer = bytearray(num_bytes)
    recv_into_exact(sock, memoryview(buffer))
    return bytes(buffer)


def recv_into_exact(sock: Stream, out: memoryview) -> None:
    """Fill ``out``; ``ProtocolError`` if the connection ends first."""
    view = memoryview(out).cast("B")
    while view.nbytes:
        received = sock.recv_into(view)
        if received == 0:
            raise ProtocolError("the peer closed the connection")
        view = view[received:]


# ---------------------------------------------------------------------------- handshake

def canonical_address(address: str) -> str:
    """``host:port`` as both ends compare it: the host lower-cased, IPv6 brackets kept, the port
    a plain number. ValueError for anything that is not ``host:port``."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(address) > MAX_ADDRESS_BYTES:
        raise ValueError(f"{address[:80]!r} is not host:port")
    return f"{host.lower()}:{int(port)}"


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes, dialled: bytes) -> bytes:
    return hmac.new(secret, label + first + second + dialled, "sha256").digest()


def client_handshake(sock: Stream, secret: bytes, dialled: str) -> None:
    """Authenticate to the server at ``dialled`` (the address connected to) and authenticate it;
    ``AuthError`` / ``ProtocolError`` if it fails."""
    hello = recv_exact(sock, len(MAGIC) + NONCE_BYTES)
    if hello[:len(MAGIC)] != MAGIC:
        raise AuthError("the peer does not speak this version of kvtier's peer protocol")
    server_nonce = hello[len(MAGIC):]
    client_nonce = os.urandom(NONCE_BYTES)
    address = canonical_address(dialled).encode("utf-8")
    sock.sendall(MAGIC + client_nonce + struct.pack("<H", len(address)) + address
                 + _mac(secret, _CLIENT_LABEL, server_nonce, client_nonce, address))
    try:
        answer = recv_exact(sock, MAC_BYTES)
    except ProtocolError:
        raise AuthError(f"the peer refused this instance (a different p2p secret, or {dialled} is not the "
                        "address it advertises?)") from None
    if not hmac.compare_digest(answer, _mac(secret, _SERVER_LABEL, client_nonce, server_nonce, address)):
        raise AuthError("the peer could not prove it holds the p2p secret")


def server_handshake(sock: Stream, secret: bytes, advertised: str) -> None:
    """Authenticate a client that dialled ``advertised`` and prove the secret to it; ``AuthError``
    when the client fails or dialled another address (a relay)."""
    server_nonce = os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + server_nonce)
    head = recv_exact(sock, len(MAGIC) + NONCE_BYTES + 2)
    if head[:len(MAGIC)] != MAGIC:
        raise AuthError("a client does not speak this version of kvtier's peer protocol")
    client_nonce = head[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    (length,) = struct.unpack_from("<H", head, len(MAGIC) + NONCE_BYTES)
    if length > MAX_ADDRESS_BYTES:
        raise AuthError("a client sent an address that is too long")
    rest = recv_exact(sock, length + MAC_BYTES)
    address, mac = rest[:length], rest[length:]
    if not hmac.compare_digest(mac, _mac(secret, _CLIENT_LABEL, server_nonce, client_nonce, address)):
        raise AuthError("a client failed to authenticate")
    if address != canonical_address(advertised).encode("utf-8"):
        raise AuthError(f"a client holding the secret dialled {address.decode('utf-8', 'replace')[:80]}, not "
                        f"this server's {advertised} (a relay, or a peer list naming this server otherwise)")
    sock.sendall(_mac(secret, _SERVER_LABEL, client_nonce, server_nonce, address))


# ---------------------------------------------------------------------------- requests

def encode_lookup(names: Sequence[str]) -> bytes:
    body = struct.pack("<I", len(names)) + b"".join(_name_bytes(name) for name in names)
    return _frame(OP_LOOKUP, body)


def encode_fetch(names: Sequence[str], most_bytes: Sequence[int]) -> bytes:
    body = struct.pack("<I", len(names)) + b"".join(_name_bytes(name) + struct.pack("<Q", most)
                                                    for name, most in zip(names, most_bytes))
    return _frame(OP_FETCH, body)


def _name_bytes(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"name of {len(raw)} bytes is longer than {MAX_NAME_BYTES}")
    return struct.pack("<H", len(raw)) + raw


def _frame(op: int, body: bytes) -> bytes:
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(body)} bytes is larger than {MAX_REQUEST_BYTES}")
    return struct.pack("<IB", len(body), op) + body


@dataclass(frozen=True)
class Request:
    """A decoded request: its op, the entries it names and, for a fetch, the most bytes of each."""

    op: int
    names: tuple[EntryName, ...]
    most_bytes: tuple[int, ...]


def read_request(sock: Stream) -> Request | None:
    """The next request on ``sock``; None when the client closed the connection between requests.
    ``ProtocolError`` for anything malformed (the server then drops the connection)."""
    first = sock.recv(1)
    if not first:
        return None
    head = first + recv_exact(sock, 4)
    body_bytes, op = struct.unpack("<IB", head)
    if op not in (OP_LOOKUP, OP_FETCH) or body_bytes > MAX_REQUEST_BYTES or body_bytes < 4:
        raise ProtocolError(f"bad request header (op {op}, {body_bytes} bytes)")
    body = memoryview(recv_exact(sock, body_bytes))
    (count,) = struct.unpack_from("<I", body)
    if count > MAX_NAMES:
        raise ProtocolError(f"{count} names in one request, at most {MAX_NAMES}")
    offset, names, most = 4, [], []
    try:
        for _ in range(count):
            (length,) = struct.unpack_from("<H", body, offset)
            name = bytes(body[offset + 2:offset + 2 + length]).decode("utf-8")
            offset += 2 + length
            names.append(parse_name(name))
            if op == OP_FETCH:
                most.append(struct.unpack_from("<Q", body, offset)[0])
                offset += 8
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed request body: {exc}") from None
    if offset != body_bytes:
        raise ProtocolError("request body has trailing bytes")
    return Request(op, tuple(names), tuple(most))


def encode_ages(ages: Sequence[float]) -> bytes:
    return struct.pack(f"<I{len(ages)}d", len(ages), *ages)


def read_ages(sock: Stream, num_names: int) -> list[float]:
    """A LOOKUP answer for ``num_names`` names; ``ProtocolError`` when it is not one."""
    (count,) = struct.unpack("<I", recv_exact(sock, 4))
    if count > num_names:
        raise ProtocolError(f"the peer holds {count} of {num_names} names")
    ages = list(struct.unpack(f"<{count}d", recv_exact(sock, 8 * count)))
    if not all(age >= 0.0 for age in ages):  # also refuses nan
        raise ProtocolError("the peer sent a negative or non-numeric age")
    return ages


def value_head(length: int | None) -> bytes:
    """The length prefix of one FETCH value (None: absent)."""
    return struct.pack("<Q", ABSENT if length is None else length)


def read_value_length(sock: Stream, most_bytes: int) -> int | None:
    """The length of the next FETCH value (None: absent); ``ProtocolError`` past ``most_bytes``."""
    (length,) = struct.unpack("<Q", recv_exact(sock, 8))
    if length == ABSENT:
        return None
    if length > most_bytes:
        raise ProtocolError(f"the peer sent a value of {length} bytes, at most {most_bytes} were asked for")
    return int(length)
