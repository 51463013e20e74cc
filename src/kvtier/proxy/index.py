"""Which instance holds which token prefix, learned from the instances' KV events.

Every instance publishes vLLM KV events (its own GPU blocks, and kvtier's tiers as media ``CPU``,
``DISK`` and ``REMOTE``; ``integrations/vllm/events.py``). A ``BlockStored`` carries the tokens of
its blocks, the block size and the parent block's hash, so the index keeps its own hash chain,
computed from tokens alone (engine hashes differ per engine and tenant): a block's prefix hash is
``xxh3_64(parent prefix hash || its tokens as uint32 LE)``, one chain per block size. A request's
tokens hashed the same way find, per instance, the longest prefix it holds on any medium.

KV computed under a LoRA adapter is another KV: a ``BlockStored`` names the adapter
(``lora_name``), and the chains of each adapter start from their own root
(``xxh3_64("lora" || name)``), so a request for adapter ``chat`` never matches blocks stored by
adapter ``sql`` or by the base model. A request names its adapter as vLLM's OpenAI server takes
it: its ``model`` field is the adapter's name (``adapter_named``).

``REMOTE`` blocks are not counted for any one instance: the remote tier is shared, every
instance reaches it alike. The index is not thread safe (the proxy's event loop owns it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

LOCAL_MEDIA = ("GPU", "CPU", "DISK")  # media that make one instance faster than another
_ROOT = b"\0" * 8


def chain_root(lora_name: str | None) -> bytes:
    """Where the prefix chains of blocks computed under ``lora_name`` (None: the base model) start."""
    return _ROOT if lora_name is None else xxhash.xxh3_64_digest(b"lora\0" + lora_name.encode())


def prefix_hashes(token_ids: Sequence[int], block_size: int, parent: bytes = _ROOT) -> list[bytes]:
    """The chained prefix hash of each full block of ``token_ids`` after ``parent``."""
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        parent = xxhash.xxh3_64_digest(parent + struct.pack(f"<{block_size}I", *block))
        hashes.append(parent)
    return hashes


@dataclass
class _Holder:
    """One instance's blocks: each engine hash's prefix and media, and each prefix's media."""

    prefix_of: dict[object, tuple[int, bytes]] = field(default_factory=dict)  # engine hash -> (size, prefix)
    held_on: dict[object, set[str]] = field(default_factory=dict)  # engine hash -> media
    # (size, prefix) -> medium -> how many engine hashes hold it there (two tenants' blocks of the
    # same tokens are two engine hashes of one prefix: removing one leaves the other)
    media: dict[tuple[int, bytes], dict[str, int]] = field(default_factory=dict)


class PrefixIndex:
    """Per instance (any name), the prefixes held on each medium."""

    def __init__(self) -> None:
        self._holders: dict[str, _Holder] = {}
        self._adapters: set[str] = set()  # LoRA names seen in stored events

    def stored(self, instance: str, medium: str | None, block_hashes: Sequence[object], parent_hash: object,
               token_ids: Sequence[int], block_size: int, lora_name: str | None) -> None:
        """A ``BlockStored``: blocks ``block_hashes`` (engine hashes) hold ``token_ids``, after the
        block ``parent_hash`` (None: the prompt's start), computed under adapter ``lora_name``
        (None: the base model). Blocks whose parent is unknown here are skipped (their prefix
        cannot be computed). ``medium`` None is vLLM's own (GPU)."""
        holder = self._holders.setdefault(instance, _Holder())
        medium = medium or "GPU"
        if block_size <= 0 or not block_hashes or len(token_ids) != block_size * len(block_hashes):
            return
        if lora_name is not None:
            self._adapters.add(lora_name)
        parent = chain_root(lora_name)
        if parent_hash is not None:
            known = holder.prefix_of.get(_hashable(parent_hash))
            if known is None or known[0] != block_size:
                return
            parent = known[1]
        for engine_hash, prefix in zip(block_hashes, prefix_hashes(token_ids, block_size, parent)):
            engine_hash = _hashable(engine_hash)
            known = holder.prefix_of.get(engine_hash)
            if known is not None and known != (block_size, prefix):
                self._forget(holder, engine_hash)  # an engine hash now naming other tokens
            holder.prefix_of[engine_hash] = (block_size, prefix)
            held_on = holder.held_on.setdefault(engine_hash, set())
            if medium not in held_on:
                held_on.add(medium)
                counts = holder.media.setdefault((block_size, prefix), {})
                counts[medium] = counts.get(medium, 0) + 1

    def removed(self, instance: str, medium: str | None, block_hashes: Iterable[object]) -> None:
        holder = self._holders.get(instance)
        if holder is None:
            return
        medium = medium or "GPU"
        for engine_hash in map(_hashable, block_hashes):
            held_on = holder.held_on.get(engine_hash)
            if held_on is None or medium not in held_on:
                continue
            _drop(holder, engine_hash, medium)

    @staticmethod
    def _forget(holder: _Holder, engine_hash: object) -> None:
        for medium in list(holder.held_on.get(engine_hash, ())):
            _drop(holder, engine_hash, medium)

    def num_blocks(self, instance: str, medium: str) -> int:
        """How many blocks ``instance`` holds on ``medium``."""
        holder = self._holders.get(instance)
        return 0 if holder is None else sum(medium in media for media in holder.held_on.values())

    def cleared(self, instance: str) -> None:
        """``AllBlocksCleared``, or events were lost: forget everything the instance held."""
        self._holders.pop(instance, None)

    def adapter_named(self, model: object) -> str | None:
        """The LoRA adapter a request's ``model`` field names: an adapter some instance stored
        blocks under, else None (the base model, or an adapter nothing is cached for)."""
        return model if isinstance(model, str) and model in self._adapters else None

    def matched_tokens(self, token_ids: Sequence[int], instances: Iterable[str],
                       lora_name: str | None) -> dict[str, int]:
        """Per instance, the longest prefix of ``token_ids`` (in tokens) computed under adapter
        ``lora_name`` (None: the base model) that it holds on a local medium."""
        block_sizes = {size for holder in self._holders.values() for size, _ in holder.media}
        chains = {size: prefix_hashes(token_ids, size, chain_root(lora_name)) for size in block_sizes}
        out: dict[str, int] = {}
        for instance in instances:
            holder = self._holders.get(instance)
            out[instance] = 0 if holder is None else _longest(holder.media, chains)
        return out


def _drop(holder: _Holder, engine_hash: object, medium: str) -> None:
    """``engine_hash`` is no longer held on ``medium``."""
    held_on = holder.held_on[engine_hash]
    held_on.discard(medium)
    entry = holder.prefix_of[engine_hash]
    counts = holder.media.get(entry)
    if counts is not None and medium in counts:
        counts[medium] -= 1
        if not counts[medium]:
            del counts[medium]
        if not counts:
            del holder.media[entry]
    if not held_on:
        del holder.held_on[engine_hash], holder.prefix_of[engine_hash]


def _longest(media: Mapping[tuple[int, bytes], Mapping[str, int]], chains: Mapping[int, list[bytes]]) -> int:
    best = 0
    for size, chain in chains.items():
        num_blocks = 0
        for prefix in chain:
            if not any(medium in LOCAL_MEDIA for medium in media.get((size, prefix), ())):
                break
            num_blocks += 1
        best = max(best, num_blocks * size)
    return best


def _hashable(engine_hash: object) -> object:
    return bytes(engine_hash) if isinstance(engine_hash, (bytearray, memoryview, list)) else engine_hash
