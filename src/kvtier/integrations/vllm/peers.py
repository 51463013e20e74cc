"""Peer-to-peer start-up: the peer tier a process fetches through, and the peer server a worker runs.

Both sides read the shared secret themselves (``p2p.key_file`` / ``p2p.key_env``, through
``signing.load_peer_secret``, i.e. ``configparts.sources.load_secret``). The server runs for the
worker of rank 0 (every rank's entry files are in the same disk directory), serving the disk tier,
in a process of its own (``tiers/peer_process``): the worker hands it the secret over its stdin,
never on its command line or in its environment, and starts it without kvtier's variables and the
key variables. With ``p2p.registry`` the worker also keeps the server's address registered there
(``tiers/peer_registry``).
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
    """The peer server of this worker (a process of its own) and, with a registry, its heartbeat."""

    def __init__(self, setup: EngineSetup, files: DiskFiles) -> None:
        """Starts the peer process and waits until it listens; ``OSError`` when it cannot (the
        address taken, say)."""
        from kvtier.tiers.peer_process import child_environment, start_peer_process

        config = setup.config.p2p
        assert config.listen is not None
        host, port = check_address(config.listen)
        key_envs = (config.key_env, setup.config.encryption.key_env, setup.config.signing.key_env)
        assert config.own_address is not None  # p2p.advertise, or p2p.listen when it is not a wildcard
        self.process, self.port = start_peer_process(host, port, config.own_address, files.root, peer_secret(setup),
                                                     child_environment(os.environ, key_envs))
        self.heartbeat = None
        if config.registry is not None:
            from kvtier.tiers.peer_registry import Heartbeat, PeerRegistry

            address = config.own_address
            assert address is not None
            self.heartbeat = Heartbeat(PeerRegistry(config.registry, setup.config.remote.timeout_ms / 1000),
                                       address, config.heartbeat_ttl_s, self.serving)
        logger.info("kvtier: serving peers on %s (disk tier; peer process %d)", config.listen, self.process.pid)

    def serving(self) -> bool:
        """Whether the peer process still runs (a dead one is reaped here, not left a zombie)."""
        return self.process.poll() is None

    def close(self) -> None:
        from kvtier.tiers.peer_process import stop_peer_process

        if self.heartbeat is not None:
            self.heartbeat.close()
        stop_peer_process(self.process)


def serve_peers(setup: EngineSetup, rank: int, files: DiskFiles | None) -> PeerService | None:
    """Start the peer server when ``p2p.listen`` is set and this is rank 0; else None."""
    if setup.config.p2p.listen is None or rank != 0:
        return None
    assert files is not None, "P2P serving requires disk.path (checked by the config)"
    return PeerService(setup, files)
