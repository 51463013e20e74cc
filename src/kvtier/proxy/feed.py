"""The instances' KV events into a ``PrefixIndex``: one ZMQ SUB socket per instance.

Each vLLM instance publishes on a bound PUB socket (vLLM's default endpoint ``tcp://*:5557``:
``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'``); the proxy connects to each (``--events tcp://HOST:5557``, in the
order of the instances). Messages are ``[topic, seq (8 bytes, big-endian), msgpack KVEventBatch]``.
A gap in an instance's sequence numbers (events lost, or the instance restarted) makes the index
forget that instance: it then under-estimates what is cached there, never over-estimates. ZMQ
drops what is published before a subscriber has joined, so the index starts empty and learns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import msgspec
import zmq
import zmq.asyncio

from kvtier.proxy.index import PrefixIndex

logger = logging.getLogger("kvtier.proxy")

def apply_batch(index: PrefixIndex, instance: str, events: Sequence[object]) -> None:
    """Apply one batch's events (decoded msgpack maps) to ``index``; unknown or malformed events
    are skipped."""
    for event in events:
        if not isinstance(event, Mapping):
            continue
        kind = event.get("type")
        if kind == "BlockStored":
            hashes, tokens, size = event.get("block_hashes"), event.get("token_ids"), event.get("block_size")
            if isinstance(hashes, list) and isinstance(tokens, list) and isinstance(size, int):
                lora_name = event.get("lora_name")
                index.stored(instance, _medium(event), hashes, event.get("parent_block_hash"), tokens, size,
                             lora_name if isinstance(lora_name, str) else None)
        elif kind == "BlockRemoved":
            hashes = event.get("block_hashes")
            if isinstance(hashes, list):
                index.removed(instance, _medium(event), hashes)
        elif kind == "AllBlocksCleared":
            index.cleared(instance)


def _medium(event: Mapping[object, object]) -> str | None:
    medium = event.get("medium")
    return medium if isinstance(medium, str) else None


class EventFeed:
    """Receives every instance's events (on the proxy's event loop)."""

    def __init__(self, sources: Mapping[str, str], index: PrefixIndex) -> None:
        """``sources``: instance name -> its events endpoint (``tcp://host:port``)."""
        self._sources = dict(sources)
        self._index = index
        self._last_seq: dict[str, int] = {}
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self.num_batches = 0

    def open(self) -> None:
        context = zmq.asyncio.Context.instance()
        for instance, endpoint in self._sources.items():
            socket = context.socket(zmq.SUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.connect(endpoint)
            self._sockets[instance] = socket

    async def run(self) -> None:
        """Apply every instance's events until cancelled."""
        await asyncio.gather(*(self._run_one(name, socket) for name, socket in self._sockets.items()))

    async def _run_one(self, instance: str, socket: zmq.asyncio.Socket) -> None:
        while True:
            self.receive(instance, await socket.recv_multipart())

    def receive(self, instance: str, parts: Sequence[bytes]) -> None:
        if len(parts) != 3 or len(parts[1]) != 8:
            return
        seq = int.from_bytes(parts[1], "big", signed=True)
        last = self._last_seq.get(instance)
        if last is not None and seq != last + 1:
            logger.warning("kvtier proxy: KV events of %s jumped from %d to %d: forgetting what it held",
                           instance, last, seq)
            self._index.cleared(instance)
        self._last_seq[instance] = seq
        try:
            batch = msgspec.msgpack.decode(parts[2])
        except msgspec.DecodeError:
            return
        if isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[1], list):
            apply_batch(self._index, instance, batch[1])
            self.num_batches += 1

    def heard_from(self) -> set[str]:
        """The instances whose events have arrived (ZMQ drops what is sent before a subscriber
        joined: an instance not heard from yet is one whose cache the index knows nothing of)."""
        return set(self._last_seq)

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close()
        self._sockets.clear()
