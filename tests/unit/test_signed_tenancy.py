"""Signed tenancy on the engine side (issue 16 #1): with a signing key configured, a request's
namespace comes only from a valid namespace token and its handoff (``expect_tokens``) only from a
handoff signed for its own namespace and prompt. Without a key, requests are trusted as before.

Before this, ``{"kvtier": {"namespace": "tenant-a"}}`` from any client put the request in
tenant-a (read its KV, fill its quota) and a plain ``expect_tokens`` made a decode engine wait.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from kvtier.config import load_config
from kvtier.integrations.vllm.requests import RequestControls, Trust, request_controls
from kvtier.integrations.vllm.scheduler import SchedulerSide
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.keys import Namespace
from kvtier.metrics import Metrics
from kvtier.signing import (HandoffClaim, NamespaceClaim, SigningKey, prompt_id_of, sign_handoff, sign_namespace,
                            verify_handoff)
from tests.dict_tier import DictTier
from kvtier.layout import KVLayout
from tests.unit.test_handoff import CHUNK, LAYOUT, PROMPT, arrive, ask

KEY = SigningKey(bytes(range(32)))
NOW = 1_800_000_000.0
REFUSE = Trust(KEY, refuse_unsigned=True)
DEFAULT = Trust(KEY, refuse_unsigned=False)
OFF = RequestControls("default", False, False)


def token(namespace: str, key: SigningKey = KEY, expires_at_s: int = int(NOW) + 60) -> str:
    return sign_namespace(key, NamespaceClaim(namespace, expires_at_s))


def controls(section: dict[str, object] | None, trust: Trust = REFUSE) -> RequestControls:
    return request_controls(None if section is None else {"kvtier": section}, None, "default", trust=trust, now_s=NOW)


def test_a_plain_namespace_is_not_trusted() -> None:
    assert request_controls({"kvtier": {"namespace": "tenant-a"}}, None, "default").namespace == "tenant-a"  # no key
    for trust in (REFUSE, DEFAULT):  # never mapped to the default either: others could probe it there
        assert controls({"namespace": "tenant-a"}, trust) == OFF


def test_the_namespace_comes_from_a_valid_token() -> None:
    assert controls({"namespace_token": token("tenant-a")}) == RequestControls("tenant-a", True, True)
    assert controls({"namespace_token": token("tenant-a"), "namespace": "tenant-a", "store": False}) == \
        RequestControls("tenant-a", True, False)
    assert controls({"namespace_token": token("tenant-a"), "namespace": "tenant-b"}) == OFF


def test_bad_tokens_are_refused_in_every_mode() -> None:
    bad = (token("tenant-a", SigningKey(bytes(32))), token("tenant-a", expires_at_s=int(NOW)),
           token("tenant-a").replace("tenant-a", "tenant-b"), "kvns1:tenant-a", 42)
    for trust in (REFUSE, DEFAULT):
        for namespace_token in bad:
            assert controls({"namespace_token": namespace_token}, trust) == OFF


def test_unsigned_requests_refused_or_default_per_config() -> None:
    assert controls(None, REFUSE) == OFF
    assert controls({"store": False}, REFUSE) == OFF
    assert controls(None, DEFAULT) == RequestControls("default", True, True)
    assert controls({"namespace": "default"}, DEFAULT) == RequestControls("default", True, True)


def test_only_a_signed_handoff_of_the_same_namespace_counts() -> None:
    prompt_id = prompt_id_of(bytes(16))
    handoff = sign_handoff(KEY, HandoffClaim("tenant-a", 512, prompt_id, int(NOW) + 60))
    signed = {"namespace_token": token("tenant-a")}
    assert request_controls({"kvtier": {"expect_tokens": 512}}, None, "default").expect_tokens == 512  # no key
    assert controls({**signed, "expect_tokens": 512}).expect_tokens == 0
    assert controls({**signed, "handoff": handoff}) == RequestControls("tenant-a", True, True, "", 512, prompt_id)
    assert controls({"namespace_token": token("tenant-b"), "handoff": handoff}).expect_tokens == 0
    assert controls({**signed, "handoff": handoff.replace(":512:", ":1024:")}).expect_tokens == 0


def side(signing: bool, producer: bool = False, unsigned: str = "refuse", layout: KVLayout = LAYOUT) -> SchedulerSide:
    config = load_config({"chunk_tokens": CHUNK, "remote.handoff_wait_ms": 5000, "signing.unsigned": unsigned},
                         {}).config
    setup = EngineSetup(config, layout, Namespace("default", "m", layout.fingerprint(), 1), ("l0", "l1"), 1,
                        layout.chunk_bytes(CHUNK), 16, None, 0, producer)
    return SchedulerSide(setup, [], Metrics(), DictTier(), KEY if signing else None)


def request(section: dict[str, object] | None, request_id: str = "r1", prompt: list[int] = PROMPT) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, cache_salt=None,
                           kv_transfer_params=None if section is None else {"kvtier": section})


def test_a_prefill_engine_signs_its_handoff_and_a_decode_engine_honours_it() -> None:
    producer = side(True, producer=True)
    req = request({"namespace_token": token("tenant-a", expires_at_s=int(time.time()) + 60)})
    ask(producer, req)
    _, params = producer.request_finished(req)  # type: ignore[arg-type]
    assert params is not None
    section = params["kvtier"]
    assert isinstance(section, dict) and "namespace" not in section and section["expect_tokens"] == 4 * CHUNK
    claim = verify_handoff(KEY, section["handoff"], time.time())
    assert (claim.namespace, claim.expect_tokens) == ("tenant-a", 4 * CHUNK)

    consumer = side(True)
    decode = request({**req.kv_transfer_params["kvtier"], "handoff": section["handoff"]})
    assert ask(consumer, decode) == (None, False)  # waits for the announced chunks
    remote = consumer.remote
    assert isinstance(remote, DictTier)
    for chunk in range(4):  # the prefill's uploads arrive (in tenant-a's location)
        key = consumer.requests["r1"].keys[chunk]
        assert remote.put(key, 0, bytes(LAYOUT.chunk_bytes(CHUNK)), LAYOUT.fingerprint(), namespace="tenant-a")
    assert ask(consumer, decode) == (4 * CHUNK, True)


def test_a_decode_engine_with_a_key_ignores_unsigned_or_foreign_handoffs() -> None:
    signed = {"namespace_token": token("default", expires_at_s=int(time.time()) + 60)}
    consumer = side(True)
    # before: a plain expect_tokens made the engine hold the request back for handoff_wait_ms
    assert ask(consumer, request({**signed, "expect_tokens": 4 * CHUNK})) == (0, False)
    # a handoff signed for another prompt (same namespace, same length): not this request's
    other = sign_handoff(KEY, HandoffClaim("default", 4 * CHUNK, prompt_id_of(bytes(16)), int(time.time()) + 60))
    assert ask(consumer, request({**signed, "handoff": other}, "r2")) == (0, False)
    # without a key, as before: the plain handoff is waited for
    unsigned = side(False)
    assert ask(unsigned, request({"expect_tokens": 4 * CHUNK}), settle_s=0.1) == (None, False)
    arrive(unsigned.remote, unsigned, 0, 1, 2, 3)  # type: ignore[arg-type]
    assert ask(unsigned, request({"expect_tokens": 4 * CHUNK})) == (4 * CHUNK, True)


def test_without_a_time_tokens_are_checked_against_the_clock() -> None:
    expired = {"namespace_token": token("tenant-a", expires_at_s=int(time.time()) - 1)}
    assert request_controls({"kvtier": expired}, None, "default", trust=REFUSE) == OFF
    valid = {"namespace_token": token("tenant-a", expires_at_s=int(time.time()) + 60)}
    assert request_controls({"kvtier": valid}, None, "default", trust=REFUSE).namespace == "tenant-a"


def test_a_signed_handoff_of_a_whole_number_of_chunks_is_honoured_when_blocks_are_chunks() -> None:
    """Block size = chunk size and a prompt of exactly 4 chunks: the prefill engine announces 4,
    but the decode engine can load only 3 (its last token is always computed). The handoff was
    checked against those 3 keys and dropped, silently; now against the prompt's 4."""
    layout = KVLayout("cpu_lbhnc", 2, 1, 8, CHUNK, "bfloat16")
    prompt = PROMPT[:4 * CHUNK]
    producer = side(True, producer=True, layout=layout)
    req = request({"namespace_token": token("tenant-a", expires_at_s=int(time.time()) + 60)}, prompt=prompt)
    ask(producer, req)
    _, params = producer.request_finished(req)  # type: ignore[arg-type]
    assert params is not None and params["kvtier"]["expect_tokens"] == 4 * CHUNK
    consumer = side(True, layout=layout)
    decode = request({**req.kv_transfer_params["kvtier"], "handoff": params["kvtier"]["handoff"]}, prompt=prompt)
    assert ask(consumer, decode) == (None, False)  # waits for the announced chunks
    remote = consumer.remote
    assert isinstance(remote, DictTier)
    for chunk in range(4):
        key = consumer.requests["r1"].keys[chunk]
        assert remote.put(key, 0, bytes(layout.chunk_bytes(CHUNK)), layout.fingerprint(), namespace="tenant-a")
    assert ask(consumer, decode) == (3 * CHUNK, True)
