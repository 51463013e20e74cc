"""Which instance gets a request: the ``Router`` contract and round-robin.

Routers run on the proxy's event loop (one thread): no locks. ``failed`` marks an instance the
proxy could not reach; a router skips it for ``DOWN_S`` seconds unless every instance is down.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import httpx

from kvtier.proxy.bodies import Upstream

DOWN_S = 5.0  # an instance that could not be reached is skipped this long


class Router(Protocol):
    """Picks the instance for each request (called on the proxy's event loop)."""

    async def start(self, client: httpx.AsyncClient) -> None:
        """Start background work (event subscriptions, polls) using the proxy's pooled client."""

    async def stop(self) -> None:
        """Stop it; called once, after the last request."""

    async def route(self, path: str, body: Mapping[str, object] | None, headers: Mapping[str, str]) -> Upstream:
        """The instance for one request; ``body``: the parsed JSON of a completion (None for other
        paths); ``headers``: what the proxy forwards (a router asking an instance sends them)."""

    def done(self, upstream: Upstream) -> None:
        """A request ``route`` sent to ``upstream`` ended (answered, failed or abandoned)."""

    def failed(self, upstream: Upstream) -> None:
        """``upstream`` could not be reached or broke off."""


class DownList:
    """Instances that failed recently (monotonic seconds until they are tried again)."""

    def __init__(self, down_s: float = DOWN_S) -> None:
        self._until: dict[Upstream, float] = {}
        self._down_s = down_s

    def mark(self, upstream: Upstream) -> None:
        self._until[upstream] = time.monotonic() + self._down_s

    def is_down(self, upstream: Upstream) -> bool:
        until = self._until.get(upstream)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._until[upstream]
            return False
        return True

    def alive(self, upstreams: Sequence[Upstream]) -> list[Upstream]:
        """Those not down; all of them when every one is down (a request must go somewhere)."""
        up = [upstream for upstream in upstreams if not self.is_down(upstream)]
        return up or list(upstreams)


class RoundRobin:
    """Each request to the next instance that is not down."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        if not upstreams:
            raise ValueError("round-robin needs at least one instance")
        self.upstreams = tuple(upstreams)
        self.down = DownList()
        self._next = 0

    def next(self) -> Upstream:
        for _ in range(len(self.upstreams)):
            upstream = self.upstreams[self._next % len(self.upstreams)]
            self._next += 1
            if not self.down.is_down(upstream):
                return upstream
        upstream = self.upstreams[self._next % len(self.upstreams)]
        self._next += 1
        return upstream

    async def start(self, client: httpx.AsyncClient) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def route(self, path: str, body: Mapping[str, object] | None, headers: Mapping[str, str]) -> Upstream:
        return self.next()

    def done(self, upstream: Upstream) -> None:
        return None

    def failed(self, upstream: Upstream) -> None:
        self.down.mark(upstream)
