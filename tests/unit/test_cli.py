"""The kvtier command line: the connector JSON, the serve command, and how user errors are reported.

Nothing here starts vLLM: `serve` runs with --dry-run and `demo` only with arguments it rejects.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.errors import ConfigError
from kvtier.serve import connector_config_json, parse_inline, server_command


def test_connector_json_names_the_config_file() -> None:
    config = json.loads(connector_config_json("/etc/kvtier.yaml", {}))
    assert config == {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.integrations.vllm",
                      "kv_role": "kv_both", "kv_connector_extra_config": {"config": "/etc/kvtier.yaml"}}


def test_connector_json_without_a_file_has_no_config_key() -> None:
    config = json.loads(connector_config_json(None, {}))
    assert config["kv_connector_extra_config"] == {}


def test_connector_json_carries_inline_keys() -> None:
    config = json.loads(connector_config_json("k.yaml", {"memory.capacity": "4GiB", "metrics.port": 9464}))
    assert config["kv_connector_extra_config"] == {"memory.capacity": "4GiB", "metrics.port": 9464,
                                                   "config": "k.yaml"}


def test_roles_for_disaggregated_prefill() -> None:
    assert json.loads(connector_config_json(None, {}, "producer"))["kv_role"] == "kv_producer"
    assert json.loads(connector_config_json(None, {}, "consumer"))["kv_role"] == "kv_consumer"
    assert "kv_producer" in server_command("/m", None, {}, None, [], "producer")[6]


def test_proxy_refuses_a_bad_instance_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "--prefill", "https://h:1", "--decode", "http://h:2"]) == 2
    assert "http://host:port" in capsys.readouterr().err


def test_inline_config_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="--config"):
        connector_config_json(None, {"config": "other.yaml"})


def test_inline_values_are_read_as_yaml() -> None:
    assert parse_inline(["metrics.port=9464", "memory.capacity=2GiB", "disk.path=", "store_decode_tokens=true"]) == {
        "metrics.port": 9464, "memory.capacity": "2GiB", "disk.path": "", "store_decode_tokens": True}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_inline(["memory.capacity"])


def test_server_command_passes_engine_args_through() -> None:
    argv = server_command("/m", None, {}, 8123, ["--max-model-len", "4096", "--enforce-eager"])
    assert argv[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    assert argv[5] == "--kv-transfer-config"
    assert argv[7:] == ["--port", "8123", "--max-model-len", "4096", "--enforce-eager"]


def test_serve_dry_run_prints_the_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "kvtier.yaml"
    config.write_text("memory:\n  capacity: 1GiB\n")
    assert main(["serve", "/models/m", "--config", str(config), "--port", "8000", "--dry-run",
                 "--max-model-len", "4096", "--enforce-eager"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server --model /models/m --kv-transfer-config" in out
    assert out.rstrip().endswith("--port 8000 --max-model-len 4096 --enforce-eager")
    assert str(config) in out


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def test_serve_checks_the_config_before_starting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "kvtier.yaml"
    config.write_text("memory:\n  capacty: 1GiB\n")
    assert main(["serve", "/models/m", "--config", str(config), "--dry-run"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 2
    assert lines[0].startswith("kvtier: error: memory.capacty: unknown key")
    assert lines[1].startswith("hint: ")


def test_config_check_prints_every_key_and_its_source(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_METRICS_PORT", "9999")
    config = tmp_path / "kvtier.yaml"
    config.write_text("memory:\n  capacity: 1GiB\n")
    assert main(["config", "check", str(config)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["memory.capacity"][1:] == ["1GiB", f"file:{config}"]
    assert rows["metrics.port"][1:] == ["9999", "env:KVTIER_METRICS_PORT"]
    assert rows["chunk_tokens"][2] == "default"


def test_config_check_of_a_missing_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "check", str(tmp_path / "nope.yaml")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 2
    assert lines[0].startswith("kvtier: error: config: file not found")


@pytest.mark.parametrize("argv", [
    ["demo", "--rounds", "0"], ["demo", "--users", "many"], ["demo", "--port", "70000"], ["stats", "--bogus"],
    ["config"], [], ["bogus"],
])
def test_bad_arguments_exit_2_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: kvtier" in capsys.readouterr().err


def test_demo_refuses_rounds_that_do_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rounds", "500"]) == 2
    lines = _error_lines(capsys)
    assert lines[0] == "kvtier: error: --rounds 500 would not fit the 4,096-token context"
    assert lines[1].startswith("hint: use --rounds ")


METRICS_TEXT = """\
# HELP kvtier_hits_total Chunks served by a tier
# TYPE kvtier_hits_total counter
kvtier_hits_total{tier="memory"} 12.0
kvtier_hits_total{tier="disk"} 3.0
kvtier_hits_created{tier="memory"} 1.7e9
kvtier_read_bytes_total{tier="memory"} 6291456.0
kvtier_loaded_tokens_total 3072.0
kvtier_lookup_seconds_bucket{le="0.001"} 4.0
vllm_other_metric 5.0
"""


@pytest.fixture
def metrics_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = METRICS_TEXT.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_stats_prints_kvtier_metrics_per_tier(metrics_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--url", metrics_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "disk", "memory", "-"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"hits_total", "read_bytes_total", "loaded_tokens_total"}  # no buckets, _created, vllm_*
    assert rows["hits_total"].split() == ["hits_total", "3", "12"]
    assert "6.0 MiB" in rows["read_bytes_total"]
    assert rows["loaded_tokens_total"].split() == ["loaded_tokens_total", "3,072"]


def test_stats_unreachable_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.bench.server import free_port

    assert main(["stats", "--url", f"http://127.0.0.1:{free_port()}/metrics"]) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 2
    assert lines[0].startswith("kvtier: error: cannot reach http://127.0.0.1:")
    assert "metrics.port" in lines[1]


def test_version(capsys) -> None:
    import kvtier
    from kvtier.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvtier {kvtier.__version__}"


@pytest.mark.parametrize("assignment, key", [
    ("remote.password=hunter2-secret", "remote.password"),
    ("remote.secret_key=hunter2-secret", "remote.secret_key"),
    ("remote={password: hunter2-secret}", "remote.password"),
    ("remote.url=redis://:hunter2-secret@cache:6379/0", "remote.url"),
    ("remote.url=rediss://user:hunter2-secret@cache:6379/0", "remote.url"),
])
def test_serve_set_refuses_secrets(assignment: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    # --set values land on vLLM's command line (ps, /proc, its "non-default args" log): issue 16 #12
    assert main(["serve", "/models/m", "--set", assignment, "--dry-run"]) == 2
    err = capsys.readouterr()
    assert "hunter2" not in err.err + err.out
    assert err.err.startswith(f"kvtier: error: {key}: ") and "KVTIER_REMOTE_" in err.err


def test_serve_set_takes_urls_without_passwords() -> None:
    assert parse_inline(["remote.url=redis://cache:6379/0", "remote.username=kv"]) == {
        "remote.url": "redis://cache:6379/0", "remote.username": "kv"}


def test_token_issues_a_namespace_token_the_engines_accept(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import time

    from kvtier.signing import load_signing_key, verify_namespace

    key_file = tmp_path / "signing.key"
    key_file.write_text("ab" * 32)
    assert main(["token", "--namespace", "tenant-a", "--ttl", "60", "--key-file", str(key_file)]) == 0
    token = capsys.readouterr().out.strip()
    key = load_signing_key(str(key_file), None, {})
    assert key is not None
    claim = verify_namespace(key, token, time.time())
    assert claim.namespace == "tenant-a" and claim.expires_at_s <= time.time() + 61
    assert main(["token", "--namespace", "../x", "--key-file", str(key_file)]) == 2
    assert main(["token", "--namespace", "a", "--key-env", "KVTIER_TEST_UNSET_VAR"]) == 2
    err = capsys.readouterr().err
    assert "signing.key_env" in err and "ab" * 32 not in err
