"""Encryption at rest end to end: entries on disk are sealed; a swapped entry is a miss and the
output stays correct; a restart with the same master key serves hits."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.entry import CODEC_AES256_GCM, decode_header
from tests.conftest import free_port
from tests.e2e.engines import metric, run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, Q, QS, S2, default_keys, disk_files

pytestmark = pytest.mark.e2e


def test_sealed_disk_entries_swap_is_a_miss(tiny_model: str, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text("ab" * 32 + "\n")
    disk = tmp_path / "disk"
    config = {"memory.capacity": "64MiB", "disk.path": str(disk), "encryption.key_file": str(key_file)}
    first = run_engine({"model": tiny_model, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [Q + QS]},  # cold: a full prefill, sealed and written
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [P + S2]},  # the oracle (vLLM's own prefix cache)
    ]}, tmp_path, "sealed-first")
    files = disk_files(disk)
    q0, q1 = (Path(files.path_for(key, 0, "default")) for key in default_keys(tiny_model, Q)[:2])
    q0_bytes, q1_bytes = q0.read_bytes(), q1.read_bytes()
    assert decode_header(q0_bytes).codec == CODEC_AES256_GCM  # written sealed
    q0.write_bytes(q1_bytes)  # swap Q's two chunks on disk
    q1.write_bytes(q0_bytes)
    second = run_engine({"model": tiny_model, "kvtier": {**config, "metrics.port": free_port()}, "actions": [
        {"op": "generate", "prompts": [P + S2]},
        {"op": "generate", "prompts": [Q + QS]},
        {"op": "metrics"},
    ]}, tmp_path, "sealed-second")
    oracle, cold_q = first[2][0], first[0][0]
    restarted, swapped, text = second[0][0], second[1][0], second[2]
    assert restarted["num_cached_tokens"] == 4 * CHUNK  # sealed entries decrypt after a restart
    assert restarted["tokens"] == oracle["tokens"] and restarted["logprobs"] == oracle["logprobs"]
    assert swapped["num_cached_tokens"] == 0  # chunk 0 holds chunk 1's sealed bytes: refused
    assert swapped["tokens"] == cold_q["tokens"] and swapped["logprobs"] == cold_q["logprobs"]
    assert metric(text, "kvtier_errors_total", "disk") >= 1


def test_wrong_master_key_is_a_miss_that_deletes_nothing(tiny_model: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    for name, key in (("right", "cd" * 32), ("wrong", "ef" * 32)):
        (tmp_path / f"{name}.key").write_text(key)
    base = {"memory.capacity": "64MiB", "disk.path": str(disk)}
    run_engine({"model": tiny_model, "kvtier": {**base, "encryption.key_file": str(tmp_path / "right.key")},
                "actions": [{"op": "generate", "prompts": [P + S2]}]}, tmp_path, "key-right")
    port = free_port()
    out = run_engine({"model": tiny_model, "kvtier": {**base, "metrics.port": port,
                                                       "encryption.key_file": str(tmp_path / "wrong.key")},
                      "actions": [{"op": "generate", "prompts": [P + S2]}, {"op": "metrics"}]},
                     tmp_path, "key-wrong")
    assert out[0][0]["num_cached_tokens"] == 0
    assert metric(out[1], "kvtier_errors_total", "disk") >= 1
    # the wrong key left the entries in place: the right key still loads them
    again = run_engine({"model": tiny_model, "kvtier": {**base, "encryption.key_file": str(tmp_path / "right.key")},
                        "actions": [{"op": "generate", "prompts": [P + S2]}]}, tmp_path, "key-right-again")
    assert again[0][0]["num_cached_tokens"] == 4 * CHUNK
