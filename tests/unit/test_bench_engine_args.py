"""``kvtier bench ... -- VLLM ARGS``: vLLM arguments after ``--`` reach every server the bench
starts, after the bench's defaults (so they win), before kvtier's ``--kv-transfer-config``; the
flags the bench sets itself are refused before any server starts."""

from __future__ import annotations

import pytest

from kvtier.bench.configs import RemoteOptions, all_configs, engine_args, server_spec
from kvtier.bench.options import bench_options
from kvtier.bench.server import server_argv
from kvtier.cli import build_parser, main
from kvtier.errors import ConfigError

EXTRA = ["--gpu-memory-utilization", "0.85", "--max-model-len", "8192"]


def test_extra_arguments_follow_the_defaults_and_precede_kvtiers() -> None:
    config = next(c for c in all_configs("1GiB", RemoteOptions(None, None, None)) if c.uses_kvtier)
    spec = server_spec(config, "/models/m", 8001, 1 << 20, '{"kv_connector": "KVTierConnector"}', "/tmp/log", {},
                       EXTRA)
    argv = server_argv(spec)
    defaults = engine_args(1 << 20)
    start = argv.index(defaults[0])
    assert argv[start:start + len(defaults)] == defaults
    assert argv[start + len(defaults):start + len(defaults) + len(EXTRA)] == EXTRA
    assert argv[-2:] == ["--kv-transfer-config", '{"kv_connector": "KVTierConnector"}']
    # vLLM takes the last value of a flag given twice: the user's --max-model-len wins
    assert max(i for i, arg in enumerate(argv) if arg == "--max-model-len") > argv.index("--gpu-memory-utilization")


def test_the_cli_passes_what_follows_double_dash_to_the_options() -> None:
    args, extra = build_parser().parse_known_args(["bench", "chat", "--users", "2", "--", *EXTRA])
    assert extra == ["--", *EXTRA]
    assert bench_options(args, extra[1:]).settings.engine_extra_args == tuple(EXTRA)


@pytest.mark.parametrize("flag", ["--port", "--model=x", "--kv-transfer-config", "--host"])
def test_flags_the_bench_sets_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    args, _ = build_parser().parse_known_args(["bench", "chat"])
    with pytest.raises(ConfigError, match="set by kvtier bench itself"):
        bench_options(args, [flag, "1"])
    assert main(["bench", "chat", "--out-dir", "/nonexistent", "--", flag, "1"]) == 2
    assert "set by kvtier bench itself" in capsys.readouterr().err


def test_arguments_without_double_dash_are_still_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "chat", "--gpu-memory-utilization", "0.8"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
