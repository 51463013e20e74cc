"""Peer-to-peer start-up: the peer tier a process fetches through, and the peer server a worker runs.

Both sides read the shared secret themselves (``p2p.key_file`` / ``p2p.key_env``, through
``signing.load_peer_secret``, i.e. ``configparts.sources.load_secret``); it never crosses a
process boundary. The server runs in the
worker of rank 0 (every rank's entry files are in the same disk directory), serving the disk tier;
with ``p2p.registry`` it also keeps its address registered there (``tiers/peer_registry``).
"""

from __future__ import annotations

import logging
import os

from kvtier.configparts.values import check_address
from kvtier.crypto import Sealer
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.signing import load_peer_secret
from kvtier.tiers.disk import DiskFiles
from kvtier.tiers.peer_tier import PeerDirectory, PeerTier, RegistryPeers, StaticPeers

logger = logging.getLogger("kvtier")


def peer_secret(setup: EngineSetup) -> bytes:
    """The shared secret (at least 32 bytes, spelled like a signing key: hex or base64);
    ``ConfigError`` naming ``p2p.key_file`` / ``p2p.key_env`` when it cannot be read."""
    config = setup.config.p2p
    secret = load_peer_secret(config.key_file, config.key_env, os.environ)
    assert secret is not None, "P2PConfig requires a key source when p2p is on"
    return secret


def open_peer_tier(setup: EngineSetup, sealer: Sealer | None) -> PeerTier:
    """The peer tier of ``p2p.peers`` / ``p2p.registry`` (deadline: ``remote.timeout_ms``)."""
    config = setup.config.p2p
    timeout_s = setup.config.remote.timeout_ms / 1000
    directory: PeerDirectory
    if config.registry is not None:
        directory = RegistryPeers(config.registry, config.peer_list, config.own_address, timeout_s)
    else:
        directory = StaticPeers(config.peer_list, config.own_address)
    return PeerTier(directory, peer_secret(setup), timeout_s, sealer)


class PeerService:
    """The peer server of this worker and, with a registry, its heartbeat."""

    def __init__(self, setup: EngineSetup, files: DiskFiles) -> None:
        from kvtier.tiers.peer_server import DiskSource, PeerServer

        config = setup.config.p2p
        assert config.listen is not None
        host, port = check_address(config.listen)
        self.server = PeerServer(host, port, peer_secret(setup), DiskSource(files))
        self.heartbeat = None
        if config.registry is not None:
            from kvtier.tiers.peer_registry import Heartbeat, PeerRegistry

            address = config.own_address
            assert address is not None
            self.heartbeat = Heartbeat(PeerRegistry(config.registry, setup.config.remote.timeout_ms / 1000),
                                       address, config.heartbeat_ttl_s)
        logger.info("kvtier: serving peers on %s (disk tier)", config.listen)

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
        self.server.close()


def serve_peers(setup: EngineSetup, rank: int, files: DiskFiles | None) -> PeerService | None:
    """Start the peer server when ``p2p.listen`` is set and this is rank 0; else None."""
    if setup.config.p2p.listen is None or rank != 0:
        return None
    assert files is not None, "P2P serving requires disk.path (checked by the config)"
    return PeerService(setup, files)
