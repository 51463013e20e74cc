"""Peer-to-peer transfer: the wire protocol, authentication, the peer tier against real peer servers
(and scripted misbehaving ones), the Redis registry, and the p2p config section."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.tiers import peer_wire
from kvtier.tiers.disk import DiskFiles, ReadResult
from kvtier.tiers.peer_registry import Heartbeat, PeerRegistry
from kvtier.tiers.peer_server import DiskSource, PeerServer
from kvtier.tiers.peer_tier import PeerTier, RegistryPeers, StaticPeers
from kvtier.tiers.remote import object_name
from tests.servers import ServerProcess, port_of, redis_server  # noqa: F401  (fixture)
from tests.slow_link import SlowLink

SECRET = bytes(range(32))
LAYOUT = b"L" * 16
NS = "tenant-a"
PAYLOAD_BYTES = 4096


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _payload(i: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(PAYLOAD_BYTES))


@pytest.fixture
def files(tmp_path: Path) -> DiskFiles:
    disk = DiskFiles(str(tmp_path / "disk"), LAYOUT)
    for i in range(4):
        disk.write(_key(i), 0, _payload(i), namespace=NS)
    return disk


@pytest.fixture
def server(files: DiskFiles) -> Iterator[PeerServer]:
    peer = PeerServer("127.0.0.1", 0, SECRET, DiskSource(files.root), None)
    yield peer
    peer.close()


def _tier(*ports: int, secret: bytes = SECRET, timeout_s: float = 2.0) -> PeerTier:
    return PeerTier(StaticPeers([f"127.0.0.1:{port}" for port in ports], None), secret, timeout_s)


def _fetch(tier: PeerTier, keys: list[bytes], namespace: str = NS) -> tuple[list[ReadResult], list[bytearray]]:
    outs = [bytearray(PAYLOAD_BYTES) for _ in keys]
    results = tier.get_many_into([(key, memoryview(out)) for key, out in zip(keys, outs)], 0, LAYOUT,
                                 namespace=namespace)
    return results, outs


# ---------------------------------------------------------------------------- the real server

def test_lookup_and_fetch_from_a_peer_verified(server: PeerServer) -> None:
    tier = _tier(server.port)
    keys = [_key(i) for i in range(6)]  # 4 held, then 2 not
    assert tier.exists_prefix(keys, 0, namespace=NS) == 4
    ages = tier.held_ages(keys, 0, namespace=NS)
    assert len(ages) == 4 and all(0 <= age < 60 for age in ages)
    results, outs = _fetch(tier, keys)
    assert results == [ReadResult.OK] * 4 + [ReadResult.MISSING] * 2
    assert [bytes(out) for out in outs[:4]] == [_payload(i) for i in range(4)]
    assert server.num_entries_served == 4
    assert tier.value_bytes_read == server.num_bytes_served
    assert tier.healthy and tier.num_errors == 0
    tier.close()


def test_a_tenant_sees_only_its_own_namespace(server: PeerServer) -> None:
    tier = _tier(server.port)
    assert tier.exists_prefix([_key(0)], 0, namespace="tenant-b") == 0
    results, _ = _fetch(tier, [_key(0)], namespace="tenant-b")
    assert results == [ReadResult.MISSING]
    tier.close()


def test_a_wrong_secret_is_refused_and_costs_a_miss(server: PeerServer) -> None:
    tier = _tier(server.port, secret=b"x" * 32)
    assert tier.exists_prefix([_key(0)], 0, namespace=NS) == 0
    assert tier.num_errors == 1 and not tier.healthy
    _wait_for(lambda: server.num_refused == 1)
    assert server.num_entries_served == 0 and server.num_lookups == 0
    tier.close()


def test_a_client_that_skips_the_handshake_gets_nothing(server: PeerServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        hello = peer_wire.recv_exact(sock, len(peer_wire.MAGIC) + peer_wire.NONCE_BYTES)
        assert hello.startswith(peer_wire.MAGIC)
        sock.sendall(peer_wire.encode_lookup([object_name(_key(0), 0, NS)]).ljust(68, b"\0"))
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""  # dropped without an answer
    assert server.num_lookups == 0


def test_a_peer_killed_between_calls_costs_misses_then_backs_off(files: DiskFiles) -> None:
    server = PeerServer("127.0.0.1", 0, SECRET, DiskSource(files.root), None)
    tier = _tier(server.port)
    assert tier.exists_prefix([_key(0)], 0, namespace=NS) == 1
    server.close()
    results, _ = _fetch(tier, [_key(0), _key(1)])
    assert results == [ReadResult.MISSING] * 2
    assert not tier.healthy
    started = time.monotonic()
    assert tier.exists_prefix([_key(0)], 0, namespace=NS) == 0  # backing off: no network
    assert time.monotonic() - started < 0.05
    tier.close()


def test_a_dead_peer_beside_a_live_one_costs_nothing(server: PeerServer) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    tier = _tier(dead_port, server.port)
    assert tier.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 2
    results, _ = _fetch(tier, [_key(0), _key(1)])
    assert results == [ReadResult.OK] * 2
    assert tier.healthy and tier.num_peer_failures == 1  # skipped on the second call (backoff)
    tier.close()


def test_a_corrupt_file_on_the_peer_reads_corrupt_never_ok(server: PeerServer, files: DiskFiles) -> None:
    path = files.path_for(_key(2), 0, NS)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))  # one payload byte flipped, same length
    tier = _tier(server.port)
    results, _ = _fetch(tier, [_key(2), _key(3)])
    assert results == [ReadResult.CORRUPT, ReadResult.OK]
    assert os.path.exists(path)  # a peer's entry is never deleted by a client
    tier.close()


# ---------------------------------------------------------------------------- scripted peers

class ScriptedPeer:
    """A server that passes the handshake (it knows the secret), reads one request, then sends
    ``answer(request)`` and closes: for garbage, short and dying answers."""

    def __init__(self, answer: Callable[[peer_wire.Request], bytes], secret: bytes = SECRET,
                 then: Callable[[socket.socket], None] | None = None) -> None:
        self._answer = answer
        self._then = then
        self._secret = secret
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                try:
                    peer_wire.server_handshake(conn, self._secret, f"127.0.0.1:{self.port}")
                    request = peer_wire.read_request(conn)
                    assert request is not None
                    conn.sendall(self._answer(request))
                    if self._then is not None:
                        self._then(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def _value_of(files: DiskFiles, i: int) -> bytes:
    with open(files.path_for(_key(i), 0, NS), "rb") as f:
        return f.read()


@pytest.mark.parametrize("answer, what", [
    (lambda req: struct.pack("<I", 99), "a count larger than asked"),
    (lambda req: struct.pack("<I", 1), "a count without its ages"),
    (lambda req: struct.pack("<Id", 1, float("nan")), "an age that is not a number"),
    (lambda req: b"", "nothing"),
])
def test_garbage_lookup_answers_are_misses(answer: Callable[[peer_wire.Request], bytes], what: str) -> None:
    peer = ScriptedPeer(answer)
    tier = _tier(peer.port, timeout_s=1.0)
    assert tier.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 0, what
    assert tier.num_errors == 1
    tier.close()
    peer.close()


def test_garbage_fetch_answers_are_misses_never_ok(files: DiskFiles) -> None:
    good = _value_of(files, 0)
    cases = {
        "longer than asked": struct.pack("<Q", len(good) + 1) + good + b"x",
        "cut short": struct.pack("<Q", len(good)) + good[:100],
        "dies mid-value": struct.pack("<Q", len(good)) + good[:len(good) // 2],
        "random bytes": os.urandom(64),
    }
    for what, answer in cases.items():
        peer = ScriptedPeer(lambda req, answer=answer: answer)
        tier = _tier(peer.port, timeout_s=1.0)
        results, _ = _fetch(tier, [_key(0)])
        assert results == [ReadResult.MISSING], what
        assert tier.num_errors == 1, what
        tier.close()
        peer.close()


def test_a_stalled_or_trickling_peer_is_given_up_at_the_deadline(files: DiskFiles) -> None:
    """One deadline for the whole call: a peer that never answers, or sends a byte every 0.2 s,
    costs a miss after about ``timeout_s``, not a timeout per receive."""
    good = _value_of(files, 0)

    def trickle(conn: socket.socket) -> None:
        conn.sendall(struct.pack("<Q", len(good)))
        for byte in good:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)

    for what, behaviour in (("stalled", lambda conn: time.sleep(3)), ("trickling", trickle)):
        peer = ScriptedPeer(lambda req: b"", then=behaviour)
        tier = _tier(peer.port, timeout_s=0.5)
        started = time.monotonic()
        results, _ = _fetch(tier, [_key(0)])
        assert results == [ReadResult.MISSING], what
        assert time.monotonic() - started < 1.0, what
        tier.close()
        peer.close()


def test_a_wellformed_but_wrong_value_is_corrupt(files: DiskFiles) -> None:
    """Another key's entry sent under this key's name: verified, refused."""
    other = _value_of(files, 1)
    peer = ScriptedPeer(lambda req: struct.pack("<Q", len(other)) + other)
    tier = _tier(peer.port)
    results, outs = _fetch(tier, [_key(0)])
    assert results == [ReadResult.CORRUPT]
    tier.close()
    peer.close()


def test_a_server_with_another_secret_is_not_trusted() -> None:
    """Mutual authentication: a server that does not hold the secret fails the client's check."""
    peer = ScriptedPeer(lambda req: struct.pack("<I", 0), secret=b"y" * 32)
    tier = _tier(peer.port, timeout_s=1.0)
    assert tier.exists_prefix([_key(0)], 0, namespace=NS) == 0
    assert tier.num_errors == 1
    tier.close()
    peer.close()


# ---------------------------------------------------------------------------- the wire itself

@pytest.mark.parametrize("name", [
    "kvtier/../" + "0" * 32 + ".0", "kvtier/tenant-a/" + "0" * 31 + ".0", "kvtier/a/b/" + "0" * 32 + ".0",
    "kvtier/tenant-a/" + "G" * 32 + ".0", "other/tenant-a/" + "0" * 32 + ".0", "kvtier/./" + "0" * 32 + ".0",
])
def test_names_that_are_not_entries_are_refused(name: str) -> None:
    with pytest.raises(peer_wire.ProtocolError):
        peer_wire.parse_name(name)


def test_names_round_trip_through_requests() -> None:
    names = [object_name(_key(i), i, NS) for i in range(3)]
    left, right = socket.socketpair()
    with left, right:
        left.sendall(peer_wire.encode_fetch(names, [10, 20, 30]))
        request = peer_wire.read_request(right)
    assert request is not None and request.op == peer_wire.OP_FETCH
    assert [(e.namespace, e.key, e.rank) for e in request.names] == [(NS, _key(i), i) for i in range(3)]
    assert request.most_bytes == (10, 20, 30)


def test_a_request_with_trailing_bytes_is_refused() -> None:
    body = struct.pack("<I", 0) + b"extra"
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack("<IB", len(body), peer_wire.OP_LOOKUP) + body)
        with pytest.raises(peer_wire.ProtocolError):
            peer_wire.read_request(right)


def test_the_handshake_succeeds_with_the_secret_and_fails_without() -> None:
    cases = ((SECRET, "Peer-A:7001", True), (b"z" * 32, "peer-a:7001", False),
             (SECRET, "peer-b:7001", False))  # another address than the server's: a relay
    for client_secret, dialled, ok in cases:
        left, right = socket.socketpair()
        errors: list[Exception] = []

        def serve() -> None:
            try:
                peer_wire.server_handshake(right, SECRET, "peer-a:7001")
            except peer_wire.AuthError as exc:
                errors.append(exc)
                right.close()

        thread = threading.Thread(target=serve)
        thread.start()
        if ok:
            peer_wire.client_handshake(left, client_secret, dialled)
        else:
            with pytest.raises(peer_wire.AuthError):
                peer_wire.client_handshake(left, client_secret, dialled)
        thread.join()
        assert bool(errors) != ok
        left.close()
        right.close()


def test_a_relayed_handshake_is_refused(server: PeerServer) -> None:
    """A client that dials a relay authenticates the relay's connection to the real server unless
    the server checks which address the client dialled (review finding: the relay then read
    another tenant's entry without the secret)."""
    relay = SlowLink(server.port, bytes_per_s=64 << 20)  # a plain relay: anyone can run one, without the secret
    try:
        relayed = _tier(relay.port, timeout_s=1.0)
        assert relayed.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 0
        assert server.num_refused == 1 and server.num_lookups == 0
        relayed.close()
    finally:
        relay.close()
    direct = _tier(server.port)
    assert direct.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 2
    direct.close()


# ---------------------------------------------------------------------------- the registry

def test_registry_heartbeat_and_expiry(redis_server: ServerProcess) -> None:  # noqa: F811
    url = f"redis://127.0.0.1:{port_of(redis_server)}/0"
    registry = PeerRegistry(url, 2.0)
    registry.register("10.0.0.9:7000", 2)
    assert "10.0.0.9:7000" in registry.addresses()
    heartbeat = Heartbeat(PeerRegistry(url, 2.0), "10.0.0.1:7000", 3, lambda: True)
    peers = RegistryPeers(url, ["10.0.0.5:7000"], "10.0.0.1:7000", 2.0)
    addresses = peers.addresses()
    assert "10.0.0.9:7000" in addresses and "10.0.0.5:7000" in addresses
    assert "10.0.0.1:7000" not in addresses  # its own address is left out
    assert "10.0.0.1:7000" in registry.addresses()
    time.sleep(2.5)  # past the first key's TTL, and past one beat of the heartbeat (ttl / 3)
    found = registry.addresses()
    assert "10.0.0.9:7000" not in found  # expired: it did not beat
    assert "10.0.0.1:7000" in found  # kept alive by its heartbeat
    heartbeat.close()
    assert "10.0.0.1:7000" not in registry.addresses()
    registry.close()
    peers.close()


def test_a_server_that_died_is_unregistered_by_its_heartbeat(redis_server: ServerProcess) -> None:  # noqa: F811
    """The worker kept advertising a peer process that had crashed (review finding)."""
    url = f"redis://127.0.0.1:{port_of(redis_server)}/0"
    registry = PeerRegistry(url, 2.0)
    alive = [True]
    heartbeat = Heartbeat(PeerRegistry(url, 2.0), "10.0.0.2:7000", 3, lambda: alive[0])
    assert "10.0.0.2:7000" in registry.addresses()
    alive[0] = False
    _wait_for(lambda: "10.0.0.2:7000" not in registry.addresses(), timeout_s=3.0)  # the next beat (1 s)
    heartbeat.close()
    registry.close()


def test_garbage_in_the_registry_is_skipped(redis_server: ServerProcess, server: PeerServer) -> None:  # noqa: F811
    """Anyone who can write the registry can write anything there; "garbage" made int(port)
    raise ValueError through the engine's lookup (review finding)."""
    url = f"redis://127.0.0.1:{port_of(redis_server)}/0"
    registry = PeerRegistry(url, 2.0)
    for address in ("garbage", "host:", "h:99999", f"127.0.0.1:{server.port}"):
        registry.register(address, 30)
    tier = PeerTier(RegistryPeers(url, [], None, 2.0), SECRET, 2.0)
    assert tier.directory.addresses() == [f"127.0.0.1:{server.port}"]
    assert tier.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 2 and tier.healthy
    tier.close()
    for address in ("garbage", "host:", "h:99999", f"127.0.0.1:{server.port}"):
        registry.unregister(address)
    registry.close()


def test_a_stalled_peer_costs_one_miss_not_the_tier(server: PeerServer) -> None:
    """A peer that accepts and never answers used the whole deadline; every peer after it was
    blamed and backed off, and the tier went unhealthy (review finding)."""
    stalled = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    try:
        tier = _tier(stalled.getsockname()[1], server.port, timeout_s=0.5)
        assert tier.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 0  # the deadline went to the stalled one
        assert tier.healthy and tier.num_peer_failures == 1
        assert tier.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 2  # the stalled one backs off
        tier.close()
    finally:
        stalled.close()


def test_lookups_and_fetches_longer_than_a_request_are_split(server: PeerServer, monkeypatch) -> None:
    """The server takes at most MAX_NAMES names a request; a 64K-token prompt in 16-token chunks
    has more, and the whole lookup was refused (review finding)."""
    from kvtier.tiers import peer_tier

    monkeypatch.setattr(peer_wire, "MAX_NAMES", 2)  # the server's limit
    monkeypatch.setattr(peer_tier, "MAX_NAMES", 2)  # the client's batches
    tier = _tier(server.port)
    assert tier.exists_prefix([_key(i) for i in range(4)], 0, namespace=NS) == 4
    assert tier.exists_prefix([_key(0), _key(1), _key(9), _key(2)], 0, namespace=NS) == 2
    results, outs = _fetch(tier, [_key(i) for i in range(4)])
    assert results == [ReadResult.OK] * 4 and [bytes(out) for out in outs] == [_payload(i) for i in range(4)]
    tier.close()


def test_a_connection_the_server_closed_while_idle_is_made_again(files: DiskFiles, monkeypatch) -> None:
    """The server drops connections idle for IDLE_TIMEOUT_S; the client kept them, and the next
    call failed (a miss, and with one peer an unhealthy tier) (review finding)."""
    from kvtier.tiers import peer_server

    monkeypatch.setattr(peer_server, "IDLE_TIMEOUT_S", 0.2)
    server = PeerServer("127.0.0.1", 0, SECRET, DiskSource(files.root), None)
    tier = _tier(server.port)
    assert tier.exists_prefix([_key(0)], 0, namespace=NS) == 1
    time.sleep(0.6)  # the server has closed the idle connection
    assert tier.exists_prefix([_key(0), _key(1)], 0, namespace=NS) == 2
    assert tier.healthy and tier.num_peer_failures == 0
    tier.close()
    server.close()


def test_a_dead_registry_is_an_empty_list_not_a_failure() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    tier = PeerTier(RegistryPeers(f"redis://127.0.0.1:{port}/0", [], None, 0.5), SECRET, 1.0)
    assert tier.exists_prefix([_key(0)], 0, namespace=NS) == 0
    assert tier.healthy
    tier.close()


# ---------------------------------------------------------------------------- config

def test_p2p_config_checks() -> None:
    env = {"PEER_SECRET": "00" * 32}
    loaded = load_config({"p2p": {"peers": "127.0.0.1:7001,peer-b:7001", "key_env": "PEER_SECRET"}}, env)
    assert loaded.config.p2p.peer_list == ("127.0.0.1:7001", "peer-b:7001")
    assert loaded.config.p2p.fetches
    with pytest.raises(ConfigError, match="p2p.key_file"):
        load_config({"p2p": {"peers": "127.0.0.1:7001"}}, env)
    with pytest.raises(ConfigError, match="p2p.peers"):
        load_config({"p2p": {"peers": "127.0.0.1:7001", "key_env": "PEER_SECRET"},
                     "remote": {"url": "redis://127.0.0.1:6379"}}, env)
    with pytest.raises(ConfigError, match="p2p.listen"):
        load_config({"p2p": {"listen": "127.0.0.1:7001", "key_env": "PEER_SECRET"}}, env)
    with pytest.raises(ConfigError, match="p2p.peers"):
        load_config({"p2p": {"peers": "127.0.0.1:99999", "key_env": "PEER_SECRET"}}, env)
    with pytest.raises(ConfigError, match="p2p.advertise"):
        load_config({"p2p": {"listen": "0.0.0.0:7001", "registry": "redis://r:6379", "key_env": "PEER_SECRET"},
                     "disk": {"path": "/tmp/x"}}, env)
    with pytest.raises(ConfigError, match="p2p.registry"):
        load_config({"p2p": {"registry": "s3://bucket/x", "key_env": "PEER_SECRET"}}, env)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_nothing_is_uploaded_to_peers() -> None:
    """The peer tier stores nothing: a store plans a memory slot and no upload (with Redis it would
    plan one), so no slot is copied aside for an uploader that has nowhere to put it."""
    from tests.unit.test_handoff import side
    from tests.dict_tier import DictTier

    peers = _tier()
    with_peers = side(peers)  # type: ignore[arg-type]
    planned = with_peers.manager.plan_store(_key(1), "default")
    assert planned is not None and planned[1] is None
    with_redis_like = side(DictTier())
    planned = with_redis_like.manager.plan_store(_key(1), "default")
    assert planned is not None and planned[1] is not None
    peers.close()


def test_start_up_serves_and_fetches_through_the_configured_peers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """integrations/vllm/peers.py as the connector uses it: the worker's peer server on
    ``p2p.listen`` and another instance's peer tier on ``p2p.peers``, the secret from
    ``p2p.key_env``; a wrong secret on the fetching side reads nothing."""
    from kvtier.integrations.vllm.peers import open_peer_tier, serve_peers
    from kvtier.integrations.vllm.setup import EngineSetup
    from kvtier.keys import Namespace
    from kvtier.layout import KVLayout

    port = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    layout = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")

    def setup(config: dict) -> EngineSetup:
        loaded = load_config({"chunk_tokens": 16, "p2p.key_env": "PEER_SECRET", **config}, os.environ).config
        return EngineSetup(loaded, layout, Namespace("default", "m", layout.fingerprint(), 1), ("l0", "l1"), 1,
                           layout.chunk_bytes(16), 16, loaded.disk.path, 0)

    monkeypatch.setenv("PEER_SECRET", "ab" * 32)
    server_setup = setup({"p2p.listen": address, "disk.path": str(tmp_path / "disk")})
    files = DiskFiles(str(tmp_path / "disk"), layout.fingerprint())
    files.write(_key(1), 0, bytes(layout.chunk_bytes(16)), namespace="default")
    assert serve_peers(server_setup, 1, files) is None  # rank 0 serves, the others do not
    service = serve_peers(server_setup, 0, files)
    assert service is not None
    try:
        assert service.process.poll() is None  # a process of its own, started without the key variable
        assert b"PEER_SECRET=" not in Path(f"/proc/{service.process.pid}/environ").read_bytes()
        tier = open_peer_tier(setup({"p2p.peers": address}), None)
        out = bytearray(layout.chunk_bytes(16))
        assert tier.get_into(_key(1), 0, memoryview(out), layout.fingerprint(), namespace="default") is ReadResult.OK
        tier.close()
        monkeypatch.setenv("PEER_SECRET", "cd" * 32)
        wrong = open_peer_tier(setup({"p2p.peers": address}), None)
        assert wrong.exists_prefix([_key(1)], 0, namespace="default") == 0
        wrong.close()
    finally:
        service.close()
