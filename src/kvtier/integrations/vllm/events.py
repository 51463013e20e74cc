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
  Dynamo do) and uses the engine's hashes to match removals.
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
from typing import TYPE_CHECKING

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

from kvtier.disk_books import DiskBooks
from kvtier.events import EventLog, TierEvent
from kvtier.tiers.disk_tokens import ChunkTokenFiles, TokenWriter

if TYPE_CHECKING:
    from vllm.config import VllmConfig

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


class ChunkTokens:
    """The parent key and tokens of recently keyed chunks, most recent last, bounded (tokens kept
    as uint32: 4 bytes a token, far below the chunk's KV)."""

    def __init__(self, capacity: int) -> None:
        self._chunks: OrderedDict[bytes, tuple[bytes | None, array.array]] = OrderedDict()
        self._capacity = capacity

    def remember(self, key: bytes, parent: bytes | None, tokens: Sequence[int]) -> None:
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return
        self._chunks[key] = (parent, array.array("I", tokens))
        if len(self._chunks) > self._capacity:
            self._chunks.popitem(last=False)

    def get(self, key: bytes) -> tuple[bytes | None, list[int]] | None:
        chunk = self._chunks.get(key)
        if chunk is None:
            return None
        self._chunks.move_to_end(key)
        return chunk[0], chunk[1].tolist()


class EventTranslator:
    """Turns ``TierEvent`` lists into vLLM KV events (see the module docstring)."""

    def __init__(self, chunk_tokens: int, chunks: ChunkTokens, int_hashes: bool,
                 on_disk_stored: Callable[[bytes, bytes | None, list[int]], None] | None = None) -> None:
        self.chunk_tokens = chunk_tokens
        self.chunks = chunks
        self.int_hashes = int_hashes
        self.on_disk_stored = on_disk_stored  # told the parent and tokens of every chunk announced on disk
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
        """One ``BlockStored`` per run of chunks that extend each other."""
        out: list[KVCacheEvent] = []
        run: list[bytes] = []
        tokens: list[int] = []
        first_parent: bytes | None = None
        for key in event.keys:
            chunk = self.chunks.get(key)
            if chunk is None:
                self.num_unannounced += 1
                continue
            parent, chunk_token_ids = chunk
            if event.tier == "disk" and self.on_disk_stored is not None:
                self.on_disk_stored(key, parent, chunk_token_ids)
            if run and parent != run[-1]:
                out.append(self._block_stored(run, first_parent, tokens, event.tier))
                run, tokens = [], []
            if not run:
                first_parent = parent
            run.append(key)
            tokens += chunk_token_ids
        if run:
            out.append(self._block_stored(run, first_parent, tokens, event.tier))
        return out

    def _block_stored(self, keys: list[bytes], parent: bytes | None, tokens: list[int], tier: str) -> BlockStored:
        return BlockStored(block_hashes=[self.block_hash(key) for key in keys],
                           parent_block_hash=None if parent is None else self.block_hash(parent),
                           token_ids=tokens, block_size=self.chunk_tokens, lora_id=None, medium=MEDIUM[tier],
                           lora_name=None)


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

    def _keep_tokens(self, key: bytes, parent: bytes | None, tokens: list[int]) -> None:
        entry = self._disk.get(key) if self._disk is not None else None
        if entry is not None and self._writer is not None:
            self._writer.submit(key, entry.namespace, parent, tokens)


def announce_disk(disk: DiskBooks, files: ChunkTokenFiles, chunk_tokens: int, int_hashes: bool) -> list[KVCacheEvent]:
    """``BlockStored`` events (medium ``DISK``) for the entries of ``disk`` whose tokens files read
    back, oldest first; removes the tokens files of entries that are gone."""
    entries = [(key, entry.namespace) for key, entry in disk.items()]
    files.remove_orphans(entries)
    found = ChunkTokens(max(len(entries), 1))
    keys = []
    for key, namespace in entries:
        chunk = files.read(key, namespace)
        if chunk is not None and len(chunk[1]) == chunk_tokens:
            found.remember(key, *chunk)
            keys.append(key)
    return EventTranslator(chunk_tokens, found, int_hashes).translate([TierEvent("stored", "disk", tuple(keys))])
