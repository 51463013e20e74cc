"""kvtier's tier events as vLLM KV events (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``).

vLLM's scheduler calls the connector's ``take_events`` every step and publishes what it returns
with its own events (``--kv-events-config``: ZMQ PUB, msgpack ``KVEventBatch``), so routers that
read vLLM's events (llm-d's KV cache indexer, Dynamo's router, ``kvtier proxy --events``) see
kvtier's tiers as further media:

- ``medium``: ``CPU`` (kvtier's host-memory tier), ``DISK``, ``REMOTE`` (shared by every instance
  of the remote tier: the instance announces what its books say the remote holds);
- one block per kvtier chunk: ``block_size`` is ``chunk_tokens`` (a multiple of vLLM's block
  size), ``token_ids`` the chunk's tokens, ``parent_block_hash`` the previous chunk's hash (None
  for a prompt's first chunk); consecutive chunks of one prompt share one ``BlockStored``;
- block hashes are kvtier's chunk keys (128-bit xxh3 over the namespace digest, the parent key and
  the tokens): as bytes, or, when vLLM publishes integer hashes
  (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, on by default), their low 64 bits as vLLM does with
  its own. A router recomputes its own chain from ``token_ids`` and the parent (as llm-d and
  Dynamo do) and uses the engine's hashes to match removals;
- ``lora_id`` and ``lora_name``: the request's LoRA adapter, as vLLM fills them in its own events
  (chunks of different adapters never share a ``BlockStored``), so a router keeps each adapter's
  chains apart (``kvtier proxy`` does: ``proxy/index.py``).
Disk entries found at start-up are announced (one ``BlockStored`` run per chain, medium ``DISK``,
with the first events the engine publishes) when their tokens were kept: with KV events on, every
chunk announced on disk also gets a tokens file beside its entry (``tiers/disk_tokens.py``,
written on a background thread, sealed with encryption at rest). Entries without one (written
with events off, or by an older kvtier) are not announced.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

from kvtier.disk_books import DiskBooks
from kvtier.events import EventLog, TierEvent
from kvtier.tiers.disk_tokens import ChunkRecord, ChunkTokenFiles, TokenWriter

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

MEDIUM = {"memory": "CPU", "disk": "DISK", "remote": "REMOTE"}
EXTRA_CHUNKS = 16_384  # chunks remembered beyond the memory tier's slots (disk, remote, in flight)
_LOW_64 = (1 << 64) - 1


def events_enabled(vllm_config: "VllmConfig") -> bool:
    """Whether vLLM publishes KV events (then kvtier records its tiers' events for it)."""
    events = vllm_config.kv_events_config
    return events is not None and bool(events.enable_kv_cache_events)


def int_block_hashes() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)


class Adapter(NamedTuple):
    """A LoRA adapter as vLLM names it in its own events."""

    adapter_id: int | None  # vLLM's number for it in this engine (None: announced after a restart)
    name: str


def adapter_of(request: "Request") -> Adapter | None:
    """The LoRA adapter ``request`` runs under (None: the base model)."""
    lora = getattr(request, "lora_request", None)
    return None if lora is None else Adapter(lora.adapter_id, lora.name)


class Chunk(NamedTuple):
    """What an event says of one chunk besides its hash."""

    parent: bytes | None
    tokens: list[int]
    adapter: Adapter | None


class ChunkTokens:
    """The parent key, tokens and adapter of recently keyed chunks, most recent last, bounded
    (tokens kept as uint32: 4 bytes a token, far below the chunk's KV)."""

    def __init__(self, capacity: int) -> None:
        self._chunks: OrderedDict[bytes, tuple[bytes | None, array.array, Adapter | None]] = OrderedDict()
        self._capacity = capacity

    def remember(self, key: bytes, parent: bytes | None, tokens: Sequence[int], adapter: Adapter | None) -> None:
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return
        self._chunks[key] = (parent, array.array("I", tokens), adapter)
        if len(self._chunks) > self._capacity:
            self._chunks.popitem(last=False)

    def get(self, key: bytes) -> Chunk | None:
        chunk = self._chunks.get(key)
        if chunk is None:
            return None
        self._chunks.move_to_end(key)
        return Chunk(chunk[0], chunk[1].tolist(), chunk[2])


class EventTranslator:
    """Turns ``TierEvent`` lists into vLLM KV events (see the module docstring)."""

    def __init__(self, chunk_tokens: int, chunks: ChunkTokens, int_hashes: bool,
                 on_disk_stored: Callable[[bytes, ChunkRecord], None] | None = None) -> None:
        self.chunk_tokens = chunk_tokens
        self.chunks = chunks
        self.int_hashes = int_hashes
        self.on_disk_stored = on_disk_stored  # told the record of every chunk announced on disk
        self.num_unannounced = 0  # stored chunks skipped: their tokens are unknown here

    def block_hash(self, key: bytes) -> bytes | int:
        return int.from_bytes(key, "big") & _LOW_64 if self.int_hashes else key

    def translate(self, events: Sequence[TierEvent]) -> list[KVCacheEvent]:
        out: list[KVCacheEvent] = []
        for event in events:
            if event.kind == "cleared":  # vLLM's event names no medium: one clears the instance
                if not out or not isinstance(out[-1], AllBlocksCleared):
                    out.append(AllBlocksCleared())
            elif event.kind == "removed":
                out.append(BlockRemoved(block_hashes=[self.block_hash(key) for key in event.keys],
                                        medium=MEDIUM[event.tier]))
            else:
                out += self._stored(event)
        return out

    def _stored(self, event: TierEvent) -> list[KVCacheEvent]:
        """One ``BlockStored`` per run of chunks of one adapter that extend each other."""
        out: list[KVCacheEvent] = []
        run: list[bytes] = []
        tokens: list[int] = []
        first: Chunk | None = None
        for key in event.keys:
            chunk = self.chunks.get(key)
            if chunk is None:
                self.num_unannounced += 1
                continue
            if event.tier == "disk" and self.on_disk_stored is not None:
                name = None if chunk.adapter is None else chunk.adapter.name
                self.on_disk_stored(key, ChunkRecord(chunk.parent, chunk.tokens, name))
            if run and first is not None and (chunk.parent != run[-1] or chunk.adapter != first.adapter):
                out.append(self._block_stored(run, first, tokens, event.tier))
                run, tokens = [], []
            if not run:
                first = chunk
            run.append(key)
            tokens += chunk.tokens
        if run and first is not None:
            out.append(self._block_stored(run, first, tokens, event.tier))
        return out

    def _block_stored(self, keys: list[bytes], first: Chunk, tokens: list[int], tier: str) -> BlockStored:
        adapter = first.adapter
        return BlockStored(block_hashes=[self.block_hash(key) for key in keys],
                           parent_block_hash=None if first.parent is None else self.block_hash(first.parent),
                           token_ids=tokens, block_size=self.chunk_tokens,
                           lora_id=None if adapter is None else adapter.adapter_id, medium=MEDIUM[tier],
                           lora_name=None if adapter is None else adapter.name)


class KVEvents:
    """kvtier's tiers as vLLM KV events for one engine: the log the books record into, the tokens
    of recently keyed chunks, and, with a disk tier, the tokens files that let a restarted engine
    announce its disk (see the module docstring). Used from the scheduler's thread only."""

    def __init__(self, chunk_tokens: int, capacity: int, int_hashes: bool, disk: DiskBooks | None,
                 token_files: ChunkTokenFiles | None) -> None:
        """``capacity``: chunks whose tokens are remembered; ``disk``: the disk tier's books (its
        entries at start-up are announced from ``token_files``)."""
        self.log = EventLog(("memory", "disk", "remote"))
        self.chunks = ChunkTokens(capacity)
        self._disk = disk
        self._writer: TokenWriter | None = None
        self._startup: list[KVCacheEvent] = []
        on_disk_stored = None
        if disk is not None and token_files is not None:
            self._startup = announce_disk(disk, token_files, chunk_tokens, int_hashes)
            self._writer = TokenWriter(token_files)
            on_disk_stored = self._keep_tokens
        self.translator = EventTranslator(chunk_tokens, self.chunks, int_hashes, on_disk_stored)

    def take(self) -> list[KVCacheEvent]:
        """What the tiers stored and removed since the last call (the disk found at start-up first)."""
        startup, self._startup = self._startup, []
        return startup + self.translator.translate(self.log.take())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _keep_tokens(self, key: bytes, record: ChunkRecord) -> None:
        entry = self._disk.get(key) if self._disk is not None else None
        if entry is not None and self._writer is not None:
            self._writer.submit(key, entry.namespace, record)


def announce_disk(disk: DiskBooks, files: ChunkTokenFiles, chunk_tokens: int, int_hashes: bool) -> list[KVCacheEvent]:
    """``BlockStored`` events (medium ``DISK``) for the entries of ``disk`` whose tokens files read
    back, oldest first; removes the tokens files of entries that are gone."""
    entries = [(key, entry.namespace) for key, entry in disk.items()]
    files.remove_orphans(entries)
    found = ChunkTokens(max(len(entries), 1))
    keys = []
    for key, namespace in entries:
        record = files.read(key, namespace)
        if record is not None and len(record.tokens) == chunk_tokens:
            adapter = None if record.lora_name is None else Adapter(None, record.lora_name)
            found.remember(key, record.parent, record.tokens, adapter)
            keys.append(key)
    return EventTranslator(chunk_tokens, found, int_hashes).translate([TierEvent("stored", "disk", tuple(keys))])
