"""Peer discovery through Redis: each instance that serves peers registers its address under a key
with a TTL and refreshes it (a heartbeat); readers list the keys. An instance that dies drops out
of the list when its key expires (``p2p.heartbeat_ttl`` seconds at most).

Keys: ``kvtier:p2p:peer:<host>:<port>``, value ``1``, ``EX ttl``. Nothing else is stored, and
nothing read from Redis is trusted beyond an address to try: every peer must still pass the HMAC
handshake, and every entry it sends is verified.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvtier.tiers.io_threads import unbind_this_thread

logger = logging.getLogger(__name__)

KEY_PREFIX = "kvtier:p2p:peer:"
MAX_PEERS = 1024


class PeerRegistry:
    """The peer list on a Redis server (``url``: ``redis://`` or ``rediss://``)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0))

    def register(self, address: str, ttl_s: int) -> None:
        """Announce ``address`` for ``ttl_s`` seconds; ``redis.RedisError`` / ``OSError`` on failure."""
        self._client.set(KEY_PREFIX + address, b"1", ex=ttl_s)

    def unregister(self, address: str) -> None:
        self._client.delete(KEY_PREFIX + address)

    def addresses(self) -> list[str]:
        """The registered addresses (at most ``MAX_PEERS``), sorted; raises on failure."""
        found: list[str] = []
        for name in self._client.scan_iter(match=KEY_PREFIX + "*", count=1000):
            found.append(name.decode("utf-8", errors="replace")[len(KEY_PREFIX):])
            if len(found) >= MAX_PEERS:
                break
        return sorted(found)

    def close(self) -> None:
        self._client.close()


class Heartbeat:
    """Keeps ``address`` registered: ``register`` every ``ttl_s / 3`` seconds on a daemon thread
    (failures are logged and retried on the next beat) while ``serving()`` says the server runs;
    once it does not, unregisters and stops beating. ``close`` stops and unregisters."""

    def __init__(self, registry: PeerRegistry, address: str, ttl_s: int, serving: Callable[[], bool]) -> None:
        self._registry = registry
        self._address = address
        self._ttl_s = ttl_s
        self._serving = serving
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="kvtier-peer-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> bool:
        """Register once; False (unregistered) when the server is gone."""
        try:
            if not self._serving():
                logger.error("kvtier: the peer server for %s is gone; no longer registering it", self._address)
                self._registry.unregister(self._address)
                return False
            self._registry.register(self._address, self._ttl_s)
        except (redis.RedisError, OSError) as exc:
            logger.warning("kvtier: cannot register peer address %s: %s", self._address, exc)
        return True

    def _run(self) -> None:
        unbind_this_thread()
        while not self._stop.wait(self._ttl_s / 3):
            if not self._beat():
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        try:
            self._registry.unregister(self._address)
        except (redis.RedisError, OSError):
            pass
        self._registry.close()
