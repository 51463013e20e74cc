"""Cache-aware routing in ``kvtier proxy`` (issue 15 #2): the prefix index learned from KV events,
the routing decision, and the router in a running proxy (real ZMQ sockets, fake instances).

The events are encoded with vLLM's own ``KVEventBatch`` classes: the wire format a real instance
publishes (tests/e2e/test_kv_events.py checks a real vLLM server's events against its tiers).
"""

from __future__ import annotations

import json
import time

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from kvtier.proxy import Proxy, Upstream, serve
from kvtier.proxy.cacheaware import Candidate, CacheAwareRouter, choose, parse_waiting
from kvtier.proxy.feed import EventFeed, apply_batch
from kvtier.proxy.index import PrefixIndex
from tests.conftest import free_port
from tests.unit.test_proxy import Instance, _Handler, post

BLOCK = 4
DOC = list(range(100, 116))  # four blocks of four tokens


def stored(hashes: list[int], parent: int | None, token_ids: list[int], medium: str = "CPU",
           block_size: int = BLOCK, lora: tuple[int, str] | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=token_ids, block_size=block_size,
                       lora_id=None if lora is None else lora[0], medium=medium,
                       lora_name=None if lora is None else lora[1])


def apply(index: PrefixIndex, instance: str, *events: object) -> None:
    wire = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(events)))  # as an instance sends it
    apply_batch(index, instance, msgspec.msgpack.decode(wire)[1])


def test_the_index_rebuilds_prefixes_from_tokens_and_parents() -> None:
    index = PrefixIndex()
    # engine hashes are opaque: each instance (and tenant) has its own; the tokens carry the prefix
    apply(index, "a", stored([11, 12], None, DOC[:8]), stored([13], 12, DOC[8:12], "DISK"))
    apply(index, "b", stored([91], None, DOC[:4], "GPU"))
    assert index.matched_tokens(DOC, ["a", "b", "c"], None) == {"a": 12, "b": 4, "c": 0}
    assert index.matched_tokens([1, 2, 3, 4, *DOC], ["a"], None) == {"a": 0}  # a prefix, not a substring
    apply(index, "a", BlockRemoved(block_hashes=[12], medium="CPU"))  # the middle block goes
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 4}
    apply(index, "a", stored([12], 11, DOC[4:8], "DISK"))  # back, on another medium
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 12}
    apply(index, "a", AllBlocksCleared())
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 0}


def test_remote_blocks_do_not_favour_one_instance_and_orphans_are_skipped() -> None:
    index = PrefixIndex()
    apply(index, "a", stored([1, 2], None, DOC[:8], "REMOTE"))  # shared: every instance reaches it alike
    apply(index, "a", stored([5], 77, DOC[:4]))  # its parent was never announced: no prefix to compute
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 0}
    apply(index, "a", stored([6], None, DOC[:8], block_size=8))  # another block size (vLLM's GPU blocks)
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 8}


def test_blocks_of_one_lora_adapter_match_only_requests_for_that_adapter() -> None:
    """The same tokens under another adapter (or the base model) are other KV: routing a request
    for adapter "chat" to the instance holding "sql"'s blocks would only buy a miss."""
    index = PrefixIndex()
    apply(index, "a", stored([1, 2], None, DOC[:8], lora=(1, "sql")), stored([3], 2, DOC[8:12], lora=(1, "sql")))
    apply(index, "b", stored([4], None, DOC[:4], lora=(7, "chat")))
    apply(index, "c", stored([5, 6, 7, 8], None, DOC))
    assert index.matched_tokens(DOC, ["a", "b", "c"], "sql") == {"a": 12, "b": 0, "c": 0}
    assert index.matched_tokens(DOC, ["a", "b", "c"], "chat") == {"a": 0, "b": 4, "c": 0}
    assert index.matched_tokens(DOC, ["a", "b", "c"], None) == {"a": 0, "b": 0, "c": 16}
    # a request names its adapter in "model"; a name nothing was stored under is the base model's
    assert [index.adapter_named(model) for model in ("sql", "chat", "base-model", None, 3)] == \
        ["sql", "chat", None, None, None]


def test_two_tenants_holding_the_same_prefix_are_counted_apart() -> None:
    """Two tenants' blocks of the same tokens are two engine hashes of one prefix: removing one
    tenant's dropped the medium for both (review finding)."""
    index = PrefixIndex()
    apply(index, "a", stored([1], None, DOC[:4]), stored([2], None, DOC[:4]))  # tenant 1, tenant 2
    apply(index, "a", BlockRemoved(block_hashes=[1], medium="CPU"))
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 4}  # tenant 2's block is still there
    apply(index, "a", stored([2], None, DOC[:4]))  # announced again: not counted twice
    apply(index, "a", BlockRemoved(block_hashes=[2], medium="CPU"))
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 0}
    assert index.num_blocks("a", "CPU") == 0


def test_choose_weighs_the_cached_prefix_against_the_queue() -> None:
    a, b = Upstream("a", 1), Upstream("b", 1)
    cached = [Candidate(a, 1024, 0, 0), Candidate(b, 0, 0, 0)]
    assert choose(cached, 2048) == a
    busy = [Candidate(a, 1024, 3, 0), Candidate(b, 0, 0, 0)]  # 3 x 512 queued tokens > 1024 cached
    assert choose(busy, 2048) == b
    assert choose([Candidate(a, 0, 0, 1), Candidate(b, 0, 0, 0)], 100) == b  # the proxy's own in-flight count
    assert choose([Candidate(b, 0, 0, 0), Candidate(a, 0, 0, 0)], 100) == b  # ties: the first
    with pytest.raises(ValueError):
        choose([], 1)


def test_waiting_requests_are_read_from_vllm_metrics() -> None:
    text = ('# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\nvllm:num_requests_waiting_by_reason 9\n')
    assert parse_waiting(text) == 5
    with pytest.raises(ValueError):  # the poll keeps the last length and goes on
        parse_waiting("not {{ prometheus")


def test_only_real_token_ids_are_routed_by_their_prefix() -> None:
    """Negative, too large or boolean "token ids" crashed the route (a bare 500) in the prefix
    hashes; they are left to the instance, which refuses them with its own 400."""
    import asyncio

    up = Upstream("127.0.0.1", 1)
    router = CacheAwareRouter([up], ["tcp://127.0.0.1:1"], poll_s=60)
    for prompt in ([-1, 5], [2**32], [True, 1]):
        assert asyncio.run(router._tokens("/v1/completions", {"prompt": prompt}, {}, [])) is None
    assert asyncio.run(router._tokens("/v1/completions", {"prompt": [1, 2]}, {}, [])) == [1, 2]


def test_a_gap_in_sequence_numbers_forgets_the_instance() -> None:
    index = PrefixIndex()
    feed = EventFeed({}, index)
    payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[stored([1], None, DOC[:4])]))
    feed.receive("a", [b"", (0).to_bytes(8, "big"), payload])
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 4}
    feed.receive("a", [b"", (5).to_bytes(8, "big"), msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[]))])
    assert index.matched_tokens(DOC, ["a"], None) == {"a": 0}


def test_the_proxy_routes_to_the_instance_holding_the_prefix() -> None:
    instances = [Instance("decode") for _ in range(3)]
    ports = [free_port() for _ in instances]
    context = zmq.Context.instance()
    publishers = [context.socket(zmq.PUB) for _ in instances]
    for publisher, port in zip(publishers, ports):
        publisher.bind(f"tcp://127.0.0.1:{port}")
    dead = Upstream("127.0.0.1", free_port())
    router = CacheAwareRouter([i.upstream for i in instances] + [dead],
                              [f"tcp://127.0.0.1:{p}" for p in ports] + [f"tcp://127.0.0.1:{free_port()}"],
                              poll_s=0.1)
    server = serve(Proxy([], [i.upstream for i in instances], 10.0, router=router), "127.0.0.1", 0)
    try:
        # instance 1 holds the document's first 12 tokens; instance 2 its first 4
        batch = {1: [stored([1, 2, 3], None, DOC[:12])], 2: [stored([7], None, DOC[:4])]}
        deadline = time.monotonic() + 20
        while router.index.matched_tokens(DOC, [instances[1].upstream.url, instances[2].upstream.url], None) != \
                {instances[1].upstream.url: 12, instances[2].upstream.url: 4}:
            assert time.monotonic() < deadline, "the events never arrived"
            for n, events in batch.items():  # ZMQ drops what is sent before the subscriber joined
                publishers[n].send_multipart([b"", (0).to_bytes(8, "big"),
                                              msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=events))])
            time.sleep(0.05)
        time.sleep(0.3)  # the metrics poll has found the dead instance
        for _ in range(3):
            status, _ = post(server.server_address[1], "/v1/completions", json.dumps({"prompt": DOC}).encode())
            assert status == 200
        assert [len(i.bodies) for i in instances] == [0, 3, 0]  # round-robin would give [1, 1, 1]
        # instance 0 holds the document under adapter "sql": only requests for "sql" go there
        while router.index.adapter_named("sql") is None:
            assert time.monotonic() < deadline + 20, "the adapter's events never arrived"
            publishers[0].send_multipart([b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode(
                KVEventBatch(ts=0.0, events=[stored([5, 6], None, DOC[:8], lora=(3, "sql"))]))])
            time.sleep(0.05)
        for model in ("sql", "base", "sql"):
            body = json.dumps({"model": model, "prompt": DOC}).encode()
            assert post(server.server_address[1], "/v1/completions", body)[0] == 200
        assert [len(i.bodies) for i in instances] == [2, 4, 0]
        deadline = time.monotonic() + 5  # every relay reports done (just after the client has its answer)
        while router.in_flight[instances[1].upstream] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert router.in_flight[instances[1].upstream] == 0
    finally:
        server.shutdown()
        for publisher in publishers:
            publisher.close()


def test_the_cli_wants_one_events_endpoint_per_instance(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli import main

    assert main(["proxy", "--instance", "http://127.0.0.1:1", "--events", "tcp://a:1", "--events", "tcp://b:2"]) == 2
    assert "--events" in capsys.readouterr().err


class TokenizingInstance(Instance):
    """A fake instance whose ``/tokenize`` answers as vLLM's does (``{"tokens": [...], ...}``):
    every prompt and chat is ``DOC``."""

    def __init__(self) -> None:
        super().__init__("decode")
        self.RequestHandlerClass = _TokenizingHandler


class _TokenizingHandler(_Handler):
    def do_POST(self) -> None:
        if self.path != "/tokenize":
            super().do_POST()
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.paths.append(self.path)
        self.server.bodies.append(request)
        self._send(200, json.dumps({"count": len(DOC), "max_model_len": 4096, "tokens": DOC}).encode())


def test_text_prompts_and_chats_are_tokenized_by_an_instance() -> None:
    instances = [TokenizingInstance(), TokenizingInstance()]
    router = CacheAwareRouter([i.upstream for i in instances], ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"],
                              poll_s=60)
    router.index.stored(instances[1].upstream.url, "CPU", [1, 2], None, DOC[:8], BLOCK, None)  # as if from its events
    server = serve(Proxy([], [i.upstream for i in instances], 10.0, router=router), "127.0.0.1", 0)
    try:
        for path, body in (("/v1/completions", {"model": "m", "prompt": "hello"}),
                           ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})):
            assert post(server.server_address[1], path, json.dumps(body).encode())[0] == 200
    finally:
        server.shutdown()
    answered = [[p for p in i.paths if p.startswith("/v1/")] for i in instances]
    assert answered == [[], ["/v1/completions", "/v1/chat/completions"]]
    tokenized = [b for i in instances for b in i.bodies if "messages" in b and "add_generation_prompt" in b]
    assert tokenized == [{"model": "m", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}]
