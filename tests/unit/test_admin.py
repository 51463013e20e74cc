"""The admin API over real HTTP on a real store and real disk files: tokens and roles, audit,
invalidation on every tier the engine has, limits, lookup, and refusal of malformed input."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.admin.audit import AuditLog
from kvtier.admin.auth import Role, Tokens, load_tokens
from kvtier.admin.http import AdminAPI, AdminServer
from kvtier.admin.service import AdminService, StoreShape
from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.keys import Namespace
from kvtier.manager import KVManager
from kvtier.metrics import Metrics
from kvtier.plans import WorkerReport
from kvtier.store import DiskSettings, TieredStore
from kvtier.tiers.disk import DiskFiles
from tests.admin_client import admin_call

READ_TOKEN = "r" * 32
ADMIN_TOKEN = "a" * 32
CHUNK_TOKENS = 4
CHUNK_BYTES = 64
LAYOUT = bytes(16)
NAMESPACE = Namespace("default", "model", LAYOUT)


@dataclass
class Admin:
    url: str
    store: TieredStore
    manager: KVManager
    service: AdminService
    disk: DiskFiles
    audit_path: Path

    def call(self, method: str, path: str, body: object = None, token: str | None = ADMIN_TOKEN,
             raw: bytes | None = None) -> tuple[int, dict]:
        return admin_call(self.url, method, path, body, token, raw)

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def store_prompt(self, namespace: str, token_ids: list[int]) -> list[bytes]:
        """Put the chunks of ``token_ids`` in memory and on disk, as the engine would."""
        keys = self.service.keys_of(namespace, "", token_ids)
        for key in keys:
            assert self.store.prepare_store(key, namespace) is not None
            self.disk.write(key, 0, bytes(CHUNK_BYTES), namespace=namespace)
        self.store.complete(WorkerReport(stored=keys, disk_written=keys))
        self.store.take_ops()
        return keys


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    store = TieredStore(16, "lru", DiskSettings(32, write_through=True), 1, Metrics(), CHUNK_BYTES, {}, time.time)
    disk = DiskFiles(str(tmp_path / "disk"), LAYOUT)
    manager = KVManager(load_config({}, {}).config, store, Metrics(), None, CHUNK_TOKENS, CHUNK_BYTES, 1)
    service = AdminService(threading.RLock(), manager, NAMESPACE, StoreShape(CHUNK_TOKENS, CHUNK_BYTES, 16, 32, 1),
                           disk, None)
    audit_path = tmp_path / "audit.jsonl"
    api = AdminAPI(service, Tokens({READ_TOKEN: Role.READ, ADMIN_TOKEN: Role.ADMIN}), AuditLog(str(audit_path)))
    server = AdminServer(api, "127.0.0.1", 0)
    yield Admin(f"http://127.0.0.1:{server.port}", store, manager, service, disk, audit_path)
    server.close()


# ----- access control and audit --------------------------------------------------------------------

@pytest.mark.parametrize("token", [None, "", "wrong-token-of-32-characters-xx", READ_TOKEN + "x"])
def test_requests_without_a_valid_token_are_refused_and_audited(admin: Admin, token: str | None) -> None:
    status, answer = admin.call("GET", "/v1/stats", token=token)
    assert status == 401 and "token" in answer["error"]
    [event] = admin.audit()
    assert event["status"] == 401 and event["path"] == "/v1/stats" and event["token_id"] is None
    assert event["client"] == "127.0.0.1" and "time" in event
    assert READ_TOKEN not in admin.audit_path.read_text()


def test_a_read_token_on_an_admin_endpoint_is_forbidden_and_audited(admin: Admin) -> None:
    keys = admin.store_prompt("tenant-a", list(range(8)))
    status, _ = admin.call("POST", "/v1/invalidate", {"namespace": "tenant-a"}, token=READ_TOKEN)
    assert status == 403
    status, _ = admin.call("PUT", "/v1/namespaces/tenant-a", {"ttl_s": 1}, token=READ_TOKEN)
    assert status == 403
    assert [(e["status"], e["role"]) for e in admin.audit()] == [(403, "read"), (403, "read")]
    assert all(e["token_id"] and e["token_id"] not in READ_TOKEN for e in admin.audit())
    assert admin.store.lookup(keys).num_chunks == 2  # nothing happened


def test_reads_with_a_read_token_work_and_are_not_audited(admin: Admin) -> None:
    admin.store_prompt("tenant-a", list(range(8)))
    assert admin.call("GET", "/v1/health", token=READ_TOKEN) == (200, {"status": "ok", "remote_healthy": None})
    status, stats = admin.call("GET", "/v1/stats", token=READ_TOKEN)
    assert status == 200 and stats["memory"]["entries"] == 2
    assert stats["namespaces"]["tenant-a"] == {"memory_entries": 2, "memory_bytes": 128, "disk_entries": 2,
                                               "disk_bytes": 128}
    assert not admin.audit_path.exists() or admin.audit() == []


# ----- invalidation --------------------------------------------------------------------------------

def test_invalidating_a_namespace_removes_it_from_memory_and_disk_and_is_audited(admin: Admin) -> None:
    mine = admin.store_prompt("tenant-a", list(range(12)))
    theirs = admin.store_prompt("tenant-b", list(range(12)))
    admin.manager.remote_known.remember(mine[0])  # uploaded by the engine
    status, report = admin.call("POST", "/v1/invalidate", {"namespace": "tenant-a"})
    assert status == 200
    assert report["memory"]["entries"] == 3 and report["disk"] == {**report["disk"], "entries": 3, "files": 3}
    assert 0 <= report["memory"]["seconds"] <= report["disk"]["seconds"] <= report["seconds"]
    assert admin.store.lookup(mine).num_chunks == 0 and admin.store.lookup(theirs).num_chunks == 3
    assert sorted(e.namespace for e in admin.disk.scan()) == ["tenant-b"] * 3
    assert mine[0] not in admin.manager.remote_known  # the engine re-uploads what it recomputes
    [event] = admin.audit()
    assert event["status"] == 200 and event["role"] == "admin" and event["detail"]["namespace"] == "tenant-a"


def test_invalidating_a_token_prefix_removes_only_its_chunks(admin: Admin) -> None:
    long_prompt = list(range(100, 116))  # 4 chunks
    other = admin.store_prompt("tenant-a", list(range(8)))
    keys = admin.store_prompt("tenant-a", long_prompt)
    status, report = admin.call("POST", "/v1/invalidate", {"namespace": "tenant-a", "token_ids": long_prompt[:9]})
    assert status == 200 and report["scope"] == "prefix" and report["keys"] == 2
    assert report["memory"]["entries"] == 2 and report["disk"]["files"] == 2
    assert admin.store.lookup(keys).num_chunks == 0  # the rest of the prompt is unreachable behind them
    assert admin.store.lookup(keys[2:]).num_chunks == 2
    assert admin.store.lookup(other).num_chunks == 2


def test_invalidating_keys_of_another_namespace_removes_nothing(admin: Admin) -> None:
    keys = admin.store_prompt("tenant-a", list(range(8)))
    status, report = admin.call("POST", "/v1/invalidate", {"namespace": "tenant-b", "keys": [k.hex() for k in keys]})
    assert status == 200 and report["memory"]["entries"] == 0 and report["disk"]["files"] == 0
    assert admin.store.lookup(keys).num_chunks == 2


# ----- limits and lookup ---------------------------------------------------------------------------

def test_limits_are_set_trimmed_and_listed(admin: Admin) -> None:
    admin.store_prompt("tenant-a", list(range(16)))
    status, answer = admin.call("PUT", "/v1/namespaces/tenant-a", {"memory_quota": "128B", "ttl_s": 60})
    assert status == 200 and answer["removed"]["memory"] == 2
    assert answer["ttl_s"] == 60 and answer["memory_quota_bytes"] == 128 and answer["disk_quota_bytes"] == 0
    status, listed = admin.call("GET", "/v1/namespaces", token=READ_TOKEN)
    assert listed["namespaces"]["tenant-a"] == {"ttl_s": 60, "memory_quota_bytes": 128, "disk_quota_bytes": 0,
                                                "memory_entries": 2, "disk_entries": 4}
    status, answer = admin.call("PUT", "/v1/namespaces/tenant-a", {"disk_quota": 64})  # ttl and memory kept
    assert answer["ttl_s"] == 60 and answer["removed"]["disk"] == 3
    assert [e["status"] for e in admin.audit()] == [200, 200]


def test_lookup_reports_cached_chunks_per_tier(admin: Admin) -> None:
    prompt = list(range(12))
    admin.store_prompt("tenant-a", prompt)
    status, answer = admin.call("POST", "/v1/lookup", {"namespace": "tenant-a", "token_ids": prompt + [1, 2, 3, 4]},
                                token=READ_TOKEN)
    assert status == 200 and answer["chunks"] == 4 and answer["cached_chunks"] == 3
    assert answer["cached_tokens"] == 12 and answer["by_tier"] == {"memory": 3, "disk": 0, "remote": 0}
    _, other = admin.call("POST", "/v1/lookup", {"namespace": "tenant-b", "token_ids": prompt}, token=READ_TOKEN)
    assert other["cached_chunks"] == 0  # the same tokens in another namespace: nothing


# ----- malformed input -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"namespace": ".."}, {"namespace": "a/b"}, {}, {"namespace": "tenant-a", "token_ids": []},
    {"namespace": "tenant-a", "token_ids": [1.5]}, {"namespace": "tenant-a", "token_ids": [-1]},
    {"namespace": "tenant-a", "token_ids": [True]}, {"namespace": "tenant-a", "keys": ["zz"]},
    {"namespace": "tenant-a", "token_ids": [1, 2, 3, 4], "keys": ["00" * 16]},
    {"namespace": "tenant-a", "token_ids": [1, 2]},  # no full chunk: never widened to the namespace
    {"namespace": "tenant-a", "salt": "s"}, {"namespace": "tenant-a", "tokens": [1, 2, 3, 4]},
])
def test_malformed_invalidations_are_refused_and_remove_nothing(admin: Admin, body: dict) -> None:
    keys = admin.store_prompt("tenant-a", list(range(8)))
    status, answer = admin.call("POST", "/v1/invalidate", body)
    assert status == 400 and answer["error"]
    assert admin.store.lookup(keys).num_chunks == 2 and len(admin.disk.scan()) == 2
    assert admin.audit()[-1]["status"] == 400


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000])
def test_bodies_that_are_not_json_objects_are_refused(admin: Admin, raw: bytes) -> None:
    status, answer = admin.call("POST", "/v1/lookup", raw=raw, token=READ_TOKEN)
    assert status == 400 and answer["error"]


def test_unknown_endpoints_and_methods_are_404_after_authentication(admin: Admin) -> None:
    assert admin.call("GET", "/v1/invalidate")[0] == 404
    assert admin.call("DELETE", "/v1/stats")[0] == 404
    assert admin.call("GET", "/etc/passwd", token=None)[0] == 401


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.one_of(st.sampled_from(["/v1/stats", "/v1/lookup", "/v1/invalidate", "/v1/namespaces/x"]),
                      st.text(max_size=40).map(lambda text: "/" + text)),
       body=st.one_of(st.none(), st.binary(max_size=200),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                   lambda inner: st.lists(inner, min_size=1, max_size=4) | st.dictionaries(
                                       st.sampled_from(["namespace", "token_ids", "keys", "salt", "ttl_s",
                                                        "memory_quota", "x"]), inner, min_size=1, max_size=4),
                                   max_leaves=12).map(lambda value: json.dumps(value).encode())))
def test_no_request_crashes_the_api(admin: Admin, method: str, path: str, body: bytes | None) -> None:
    api = AdminAPI(admin.service, Tokens({ADMIN_TOKEN: Role.ADMIN}), AuditLog(None))
    status, answer = api.handle(method, path, f"Bearer {ADMIN_TOKEN}", body, "fuzz")
    assert status in (200, 400, 404) and isinstance(answer, dict)


# ----- tokens file ---------------------------------------------------------------------------------

def test_tokens_file_is_parsed_with_roles(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\nread {READ_TOKEN}\n\nadmin {ADMIN_TOKEN}  # ops\n")
    os.chmod(path, 0o600)
    tokens = load_tokens(str(path))
    assert tokens.authenticate(f"Bearer {READ_TOKEN}").role is Role.READ
    assert tokens.authenticate(f"bearer {ADMIN_TOKEN}").role is Role.ADMIN
    assert tokens.authenticate(f"Basic {ADMIN_TOKEN}") is None


@pytest.mark.parametrize("text", ["", "# nothing\n", "read short\n", f"root {ADMIN_TOKEN}\n",
                                  f"admin {ADMIN_TOKEN} extra\n"])
def test_bad_tokens_files_are_config_errors_that_never_quote_a_token(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_tokens(str(path))
    assert info.value.key == "admin.tokens_file" and ADMIN_TOKEN not in str(info.value)


def test_the_admin_api_has_no_unauthenticated_mode() -> None:
    with pytest.raises(ConfigError, match="tokens file"):
        load_tokens(None)


# ----- the kvtier admin command ----------------------------------------------------------------------

def test_kvtier_admin_invalidates_and_reports(admin: Admin, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kvtier.cli import main

    prompt = list(range(12))
    keys = admin.store_prompt("tenant-a", prompt)
    token_file, ids_file = tmp_path / "token", tmp_path / "ids.json"
    token_file.write_text(ADMIN_TOKEN + "\n")
    ids_file.write_text(json.dumps(prompt))
    base = ["admin", "--url", admin.url, "--token-file", str(token_file)]
    assert main([*base, "lookup", "--namespace", "tenant-a", "--token-ids", str(ids_file)]) == 0
    assert json.loads(capsys.readouterr().out)["cached_chunks"] == 3
    assert main([*base, "invalidate", "--namespace", "tenant-a", "--keys", keys[2].hex()]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["entries"] == 1
    assert main([*base, "limits", "--namespace", "tenant-a", "--ttl", "30", "--memory-quota", "1GiB"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_quota_bytes"] == 2**30
    assert admin.store.lookup(keys).num_chunks == 2


def test_kvtier_admin_explains_a_refusal(admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from kvtier.cli import main

    monkeypatch.setenv("KV_READ", READ_TOKEN)
    code = main(["admin", "--url", admin.url, "--token-env", "KV_READ", "invalidate", "--namespace", "tenant-a"])
    assert code == 2
    assert "HTTP 403" in capsys.readouterr().err
    monkeypatch.setenv("KV_NONE", "")
    assert main(["admin", "--url", admin.url, "--token-env", "KV_NONE", "stats"]) == 2
    closed = "http://127.0.0.1:1"
    assert main(["admin", "--url", closed, "--token-env", "KV_READ", "stats"]) == 1
    assert "cannot reach" in capsys.readouterr().err


# ----- hardening -------------------------------------------------------------------------------------

def test_liveness_needs_no_token_and_reveals_nothing(admin: Admin) -> None:
    assert admin.call("GET", "/livez", token=None) == (200, {"status": "ok"})
    assert admin.audit() == []


def test_an_unauthenticated_request_is_refused_before_its_body_is_read(admin: Admin) -> None:
    import socket
    import urllib.parse

    host, port = urllib.parse.urlsplit(admin.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        # announces 8 MiB and sends none of it: the answer must not wait for the body
        sock.sendall(b"POST /v1/invalidate HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n")
        started = time.monotonic()
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.0 401") or reply.startswith(b"HTTP/1.1 401")
    assert time.monotonic() - started < 2


def test_unauthenticated_requests_cannot_grow_the_audit_log_without_bound(admin: Admin, monkeypatch) -> None:
    import kvtier.admin.http as admin_http

    for _ in range(admin_http.DENIED_AUDIT_PER_MINUTE + 40):
        assert admin.call("GET", "/v1/stats", token="x" * 32)[0] == 401
    assert len(admin.audit()) == admin_http.DENIED_AUDIT_PER_MINUTE


def test_authenticated_404s_and_lookups_are_audited(admin: Admin) -> None:
    assert admin.call("GET", "/v1/nothing-here", token=READ_TOKEN)[0] == 404
    assert admin.call("POST", "/v1/lookup", {"namespace": "default", "token_ids": [1, 2, 3, 4]},
                      token=READ_TOKEN)[0] == 200
    events = admin.audit()
    assert [(e["path"], e["status"], e["role"]) for e in events] == [("/v1/nothing-here", 404, "read"),
                                                                     ("/v1/lookup", 200, "read")]


@pytest.mark.parametrize("body", [{"ttl_s": 10**30}, {"ttl_s": 1e400}, {"memory_quota": 2**70},
                                  {"disk_quota": "9999999TiB"}, {"ttl_s": -1}])
def test_limits_out_of_bounds_are_a_400(admin: Admin, body: dict) -> None:
    status, answer = admin.call("PUT", "/v1/namespaces/tenant-a", raw=json.dumps(body).encode())
    assert status == 400 and "error" in answer
