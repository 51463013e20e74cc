"""``kvtier config check`` checks what start-up checks (``kvtier.preflight``): each bad setting is
reported with its key and source and the command exits 2; ``--connect`` makes a round trip to a
real Redis (and to a port nobody listens on).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier.cli import main
from tests.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, ServerProcess, free_ports, port_of, \
    redis_server, seaweed  # noqa: F401  (fixtures)

KEY_HEX = "11" * 32


def check(capsys: pytest.CaptureFixture[str], config: Path, *flags: str) -> tuple[int, list[str]]:
    """Exit code and the ``error:`` lines of ``kvtier config check``."""
    code = main(["config", "check", str(config), *flags])
    err = capsys.readouterr().err
    return code, [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]


def write(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "kvtier.yaml"
    config.write_text(text)
    return config


def test_a_usable_config_passes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    key.write_text(KEY_HEX)
    tokens = tmp_path / "tokens"
    tokens.write_text("admin " + "a" * 32 + "\n")
    tokens.chmod(0o600)
    config = write(tmp_path, f"disk:\n  path: {tmp_path}/cache/kvtier\nencryption:\n  key_file: {key}\n"
                             f"admin:\n  port: 9401\n  tokens_file: {tokens}\n  audit_log: {tmp_path}/audit.jsonl\n")
    assert check(capsys, config, "--block-size", "16") == (0, [])
    assert not (tmp_path / "cache").exists()  # checking creates nothing


def test_every_bad_file_is_named_with_its_key_and_source(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("KVTIER_ENCRYPTION_KEY_FILE", str(tmp_path / "missing.key"))
    config = write(tmp_path, f"disk:\n  path: {a_file}/kvtier\nadmin:\n  port: 9401\n"
                             f"  tokens_file: {tmp_path}/no-tokens\n  audit_log: {tmp_path}/no/such/dir/audit\n"
                             f"remote:\n  url: rediss://127.0.0.1:1\n  tls_ca: {tmp_path}/no-ca.pem\n")
    code, errors = check(capsys, config)
    assert code == 2
    source = f"file:{config}"
    assert errors[0] == f"disk.path (from {source}): {a_file} (on the way to {a_file}/kvtier) is not a folder"
    assert errors[1].startswith("encryption.key_file (from env:KVTIER_ENCRYPTION_KEY_FILE): cannot read")
    assert errors[2].startswith(f"admin.tokens_file (from {source}): cannot read {tmp_path}/no-tokens")
    assert errors[3].startswith(f"admin.audit_log (from {source}): cannot create")
    assert errors[4] == f"remote.tls_ca (from {source}): cannot read {tmp_path}/no-ca.pem"
    assert len(errors) == 5


def test_a_disk_path_that_is_a_file_or_not_writable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert check(capsys, write(tmp_path, f"disk:\n  path: {a_file}\n"))[1] == \
        [f"disk.path (from file:{tmp_path}/kvtier.yaml): {a_file} is not a folder"]
    if os.geteuid() == 0:
        return  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert check(capsys, write(tmp_path, f"disk:\n  path: {locked}\n"))[1] == \
        [f"disk.path (from file:{tmp_path}/kvtier.yaml): {locked} is not writable by this user"]


def test_chunk_tokens_against_the_engines_block_size(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path, "chunk_tokens: 100\n")
    assert check(capsys, config, "--block-size", "16") == \
        (2, [f"chunk_tokens (from file:{config}): 100 is not a multiple of the engine's block size 16; "
             f"use e.g. 96"])
    assert check(capsys, config, "--block-size", "25") == (0, [])


def test_connect_reaches_the_remote_tier(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         redis_server: ServerProcess) -> None:
    config = write(tmp_path, f"remote:\n  url: redis://127.0.0.1:{port_of(redis_server)}/0\n")
    assert check(capsys, config, "--connect") == (0, [])
    dead = write(tmp_path, f"remote:\n  url: redis://:hunter2@127.0.0.1:{free_ports(1)[0]}/0\n"
                           f"  timeout_ms: 300\n")
    code, errors = check(capsys, dead, "--connect")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"remote.url (from file:{dead}): no answer from redis://:***@127.0.0.1:")
    assert "hunter2" not in errors[0]
    assert check(capsys, dead) == (0, [])  # without --connect nothing is opened


def test_connect_reaches_an_s3_tier(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    seaweed: tuple[ServerProcess, str]) -> None:
    _, endpoint = seaweed
    common = f"  s3_endpoint: {endpoint}\n  access_key: {S3_ACCESS_KEY}\n  timeout_ms: 1000\n"
    config = write(tmp_path, f"remote:\n  url: s3://{S3_BUCKET}/check\n  secret_key: {S3_SECRET_KEY}\n{common}")
    assert check(capsys, config, "--connect") == (0, [])
    wrong = write(tmp_path, f"remote:\n  url: s3://{S3_BUCKET}/check\n  secret_key: not-the-secret\n{common}")
    code, errors = check(capsys, wrong, "--connect")
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"remote.url (from file:{wrong}): no answer")


def test_the_p2p_secret_must_load(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEER_SECRET", raising=False)
    config = write(tmp_path, "p2p:\n  peers: 127.0.0.1:7070\n  key_env: PEER_SECRET\n")
    code, errors = check(capsys, config)
    assert code == 2
    assert errors == [f"p2p.key_env (from file:{config}): environment variable PEER_SECRET is not set or empty"]
    monkeypatch.setenv("PEER_SECRET", "too short")
    assert check(capsys, config)[0] == 2
    monkeypatch.setenv("PEER_SECRET", KEY_HEX)
    assert check(capsys, config) == (0, [])
