"""Chunk keys: chained, bound to their namespace, identical across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from kvtier.keys import ChunkKey, Namespace, chunk_keys
from kvtier.layout import KVLayout

LAYOUT = KVLayout("cpu_lbhnc", 4, 2, 64, 128, "bfloat16")
NS = Namespace("tenant-a", "tiny", LAYOUT.fingerprint())
token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=70)


@given(token_lists)
def test_one_key_per_full_chunk(tokens: list[int]) -> None:
    assert len(chunk_keys(NS.digest(), tokens, 16)) == len(tokens) // 16


@given(token_lists, token_lists)
def test_a_key_names_the_whole_prefix(a: list[int], b: list[int]) -> None:
    keys_a, keys_b = chunk_keys(NS.digest(), a, 8), chunk_keys(NS.digest(), b, 8)
    for i, (ka, kb) in enumerate(zip(keys_a, keys_b)):
        assert (ka == kb) == (a[: (i + 1) * 8] == b[: (i + 1) * 8])


@given(token_lists)
def test_extending_a_chain_equals_hashing_at_once(tokens: list[int]) -> None:
    whole = chunk_keys(NS.digest(), tokens, 8)
    head = chunk_keys(NS.digest(), tokens[:24], 8)
    rest = chunk_keys(NS.digest(), tokens, 8, start=len(head), parent=head[-1].digest if head else None)
    assert head + rest == whole


def test_every_identity_field_changes_the_key() -> None:
    tokens = list(range(256))
    base = chunk_keys(NS.digest(), tokens, 256)[0]
    others = [
        Namespace("tenant-b", "tiny", LAYOUT.fingerprint()),
        Namespace("tenant-a", "other-model", LAYOUT.fingerprint()),
        Namespace("tenant-a", "tiny", KVLayout("cpu_lbhnc", 4, 2, 64, 128, "float16").fingerprint()),
        Namespace("tenant-a", "tiny", KVLayout("packed_hnd", 4, 2, 64, 128, "bfloat16").fingerprint()),
        Namespace("tenant-a", "tiny", LAYOUT.fingerprint(), world_size=2),
        Namespace("tenant-a", "tiny", LAYOUT.fingerprint(), format_version=2),
    ]
    digests = {chunk_keys(ns.digest(), tokens, 256)[0] for ns in others}
    assert base not in digests and len(digests) == len(others)
    assert base.for_rank(0) != base.for_rank(1)


def test_hex_round_trip() -> None:
    key = chunk_keys(NS.digest(), list(range(8)), 8)[0]
    assert ChunkKey.from_hex(key.hex) == key and len(key.hex) == 32


SCRIPT = """
import json
from kvtier.keys import Namespace, chunk_keys
from kvtier.layout import KVLayout
ns = Namespace("t", "m", KVLayout("cpu_lbhnc", 30, 3, 64, 128, "bfloat16").fingerprint())
print(json.dumps([k.hex for k in chunk_keys(ns.digest(), list(range(1000)), 256)]))
"""


def test_keys_identical_across_processes_and_hash_seeds() -> None:
    outputs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3
