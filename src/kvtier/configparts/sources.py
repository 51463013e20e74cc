"""The layers that set config keys: the YAML file, inline keys and ``KVTIER_*`` variables.

Each gives (dotted key, raw value, source) settings; ``kvtier.config.load_config`` checks and
merges them. Unknown keys are errors (with a "did you mean" where one is close), except
``KVTIER_*`` variables, which only warn.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

import yaml

from kvtier.configparts.keys import KEYS_BY_ENV, KEYS_BY_NAME, SECTIONS
from kvtier.configparts.values import show
from kvtier.errors import ConfigError

Setting = tuple[str, object, str]  # (dotted key, raw value, source)


def config_path(inline: Mapping[str, object], environ: Mapping[str, str]) -> str | None:
    """Absolute path of the YAML file: inline ``config``, else ``KVTIER_CONFIG``; None/"" = none."""
    named = (("extra_config", inline.get("config")), ("env:KVTIER_CONFIG", environ.get("KVTIER_CONFIG")))
    for origin, value in named:
        if value is not None and not isinstance(value, str):
            raise ConfigError("config", f"expected a file path, got {show(value)} (from {origin})")
        if value:
            return os.path.abspath(value)
    return None


def read_yaml(path: str) -> Mapping[object, object]:
    """The mapping a YAML file holds (an empty file holds an empty one)."""
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"{path} must hold a mapping of keys, got {show(data)}")
    return data


def settings_from_mapping(mapping: Mapping[object, object], source: str) -> list[Setting]:
    """(dotted key, raw value, source) for each key of a nested and/or dotted mapping.

    Raises ConfigError for an unknown key, a non-string key, a section that is not a mapping, or
    a key given twice (once nested, once dotted).
    """
    settings: dict[str, object] = {}
    for name, value in mapping.items():
        dotted = _key_name(name, source)
        pairs = [(dotted, value)]
        if dotted in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(dotted, f"expected a mapping of {dotted}.* keys, got {show(value)} "
                                          f"(from {source})")
            pairs = [(f"{dotted}.{_key_name(sub, source)}", sub_value) for sub, sub_value in value.items()]
        for full, sub_value in pairs:
            if full not in KEYS_BY_NAME:
                raise ConfigError(full, f"unknown key (from {source})"
                                        f"{_did_you_mean(full, [*KEYS_BY_NAME, *SECTIONS])}")
            if full in settings:
                raise ConfigError(full, f"given twice, nested and dotted (from {source})")
            settings[full] = sub_value
    return [(dotted, value, source) for dotted, value in settings.items()]


# What Kubernetes injects for a Service whose name starts with "kvtier" (e.g. kvtier-redis):
# <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORT NAME>], <NAME>_PORT and <NAME>_PORT_<n>_<PROTO>[_*].
_SERVICE_LINK = re.compile(r"KVTIER(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT"
                           r"|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)")


def settings_from_env(environ: Mapping[str, str]) -> tuple[list[Setting], list[str]]:
    """(dotted key, typed value, source) for each ``KVTIER_*`` variable but ``KVTIER_CONFIG``, and
    a warning for each variable that names no key (Kubernetes service links are skipped quietly)."""
    settings: list[Setting] = []
    warnings: list[str] = []
    for name in sorted(n for n in environ if n.startswith("KVTIER_") and n != "KVTIER_CONFIG"):
        source = f"env:{name}"
        key = KEYS_BY_ENV.get(name)
        if key is not None and _SERVICE_LINK.fullmatch(name) and re.match(r"(tcp|udp|sctp)://", environ[name]):
            warnings.append(f"ignoring {name}={environ[name]}: a Kubernetes service link, not the setting "
                            f"{key.dotted} (rename the Service, or set {key.dotted} in the config file)")
            continue
        if key is None:
            if not _SERVICE_LINK.fullmatch(name):
                warnings.append(f"ignoring environment variable {name}: it is not a kvtier setting"
                                f"{_did_you_mean(name, list(KEYS_BY_ENV))}")
            continue
        try:
            settings.append((key.dotted, key.from_text(environ[name]), source))
        except ValueError as exc:
            raise ConfigError(key.dotted, f"{exc} (from {source})") from None
    return settings, warnings


def _key_name(name: object, source: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(str(name), f"keys must be strings, got {show(name)} (from {source})")
    return name


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


_Key = TypeVar("_Key")


def load_secret(section: str, key_file: str | None, key_env: str | None, environ: Mapping[str, str],
                parse: Callable[[bytes], _Key]) -> _Key | None:
    """The key ``parse`` makes of the file ``key_file`` or of the environment variable named
    ``key_env`` (config ``{section}.key_file`` / ``{section}.key_env``); None when neither is set.
    Raises ``ConfigError`` naming that config key when the source is missing, unreadable or does
    not hold a key (``parse`` raises ``ValueError``). Messages never include key material."""
    if key_file is not None:
        try:
            with open(key_file, "rb") as file:
                text = file.read(4096)
        except OSError as exc:
            raise ConfigError(f"{section}.key_file", f"cannot read {key_file}: {exc.strerror or exc}") from None
        return _parsed(f"{section}.key_file", f"file {key_file}", text, parse)
    if key_env is not None:
        value = environ.get(key_env)
        if not value:
            raise ConfigError(f"{section}.key_env", f"environment variable {key_env} is not set or empty")
        return _parsed(f"{section}.key_env", f"variable {key_env}", value.encode("utf-8", errors="replace"), parse)
    return None


def _parsed(config_key: str, where: str, text: bytes, parse: Callable[[bytes], _Key]) -> _Key:
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(config_key, f"{where} {exc}") from None
