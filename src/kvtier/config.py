"""kvtier's configuration: parsed once, at the edge, into frozen objects.

Four layers, later ones winning key by key:
defaults < YAML file < inline keys (vLLM's ``kv_connector_extra_config``) < environment variables
``KVTIER_<SECTION>_<KEY>``. Every value any layer gives is checked, even one a later layer
overrides, and an unknown key in any layer is an error (with a "did you mean" where one is close).
``docs/configuration.md`` is the reference for every key; keep the two in step.

No torch, no vLLM: this module only reads mappings, strings and one YAML file.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import yaml

from kvtier.errors import ConfigError

logger = logging.getLogger("kvtier")

_Value = int | str | bool | None  # a checked value of one key

# A tenant namespace, in config, request controls, disk paths and object names: never "." or "..".
NAMESPACE_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}"
NAMESPACE_RULE = "1 to 64 of A-Z a-z 0-9 _ . -, not starting with ."


def is_namespace(name: object) -> bool:
    """Whether ``name`` is a valid tenant namespace (safe as a path component and object name)."""
    return isinstance(name, str) and re.fullmatch(NAMESPACE_PATTERN, name) is not None


@dataclass(frozen=True)
class MemoryConfig:
    """The in-memory (host RAM) tier."""

    capacity_bytes: int
    policy: str  # "lru" | "s3fifo"


@dataclass(frozen=True)
class DiskConfig:
    """The local-disk tier; off when ``path`` is None."""

    path: str | None
    capacity_bytes: int
    write_policy: str  # "spill" | "write_through"
    queue_depth: int


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition; no HTTP server when ``port`` is 0."""

    port: int
    host: str


@dataclass(frozen=True)
class RemoteConfig:
    """A shared remote tier (Redis/Valkey or S3); off when ``url`` is None."""

    url: str | None  # redis://, rediss://, redis+cluster://h:p,h:p, s3://bucket/prefix
    ttl_s: int  # 0 = entries never expire
    timeout_ms: int  # deadline of every remote call
    queue_depth: int  # bounded upload queue; full => uploads dropped and counted
    username: str | None
    password: str | None
    tls_ca: str | None
    tls_cert: str | None  # client certificate (mutual TLS), with tls_key
    tls_key: str | None
    s3_endpoint: str | None
    s3_region: str | None
    access_key: str | None
    secret_key: str | None
    compression: str  # "none", or "cachegen": lossy, smaller values (kvtier.compression)
    compression_bits: int  # cachegen: bits per quantised difference (2..8); fewer = smaller, less exact
    handoff_wait_ms: int  # how long a request with expect_tokens waits for a prefill instance's uploads
    cost_gate: bool  # fetch only when the measured remote speed beats the measured prefill speed

    def __post_init__(self) -> None:
        check_client_certificate(self.tls_cert, self.tls_key)


def check_client_certificate(tls_cert: str | None, tls_key: str | None) -> None:
    """A client certificate comes with its key: ``ConfigError`` naming the one missing."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("remote.tls_key" if tls_key is None else "remote.tls_cert",
                          "set both remote.tls_cert and remote.tls_key (a client certificate and its key), "
                          "or neither")


@dataclass(frozen=True)
class EncryptionConfig:
    """Encryption at rest of the disk and remote tiers (``kvtier.crypto``): the master key comes
    from the file ``key_file`` or the environment variable named ``key_env``. Both None: entries
    are stored in clear. Both set: ``ConfigError`` on construction."""

    key_file: str | None  # file holding the 32-byte master key as 64 hex digits or base64
    key_env: str | None  # name of the environment variable holding it (hex or base64)

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env is not None:
            raise ConfigError("encryption.key_env", "set only one of encryption.key_file and encryption.key_env")


@dataclass(frozen=True)
class SigningConfig:
    """Signed tenancy (``kvtier.signing``): with a key (from the file ``key_file`` or the
    environment variable named ``key_env``, never a value on a command line) a request's namespace
    comes only from a valid namespace token and ``expect_tokens`` only from a valid handoff.
    ``unsigned``: what a request without a namespace token gets, ``refuse`` (served without kvtier)
    or ``default`` (the configured ``namespace``). No key: requests are trusted as before."""

    key_file: str | None
    key_env: str | None
    unsigned: str = "refuse"

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env is not None:
            raise ConfigError("signing.key_env", "set only one of signing.key_file and signing.key_env")


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP API (``kvtier.admin``); off when ``port`` is 0. ``tokens_file`` is required
    when it is on: there is no unauthenticated mode."""

    port: int
    host: str
    tokens_file: str | None  # lines "<role> <token>", role "read" or "admin"
    audit_log: str | None  # JSON-lines file; None = the "kvtier.audit" logger (stderr)


@dataclass(frozen=True)
class NamespaceLimits:
    """Limits of one tenant namespace; 0 = no limit."""

    ttl_s: int = 0  # entries older than this are misses and are removed (memory, disk; Redis EX)
    memory_bytes: int = 0  # byte quota in the memory tier
    disk_bytes: int = 0  # byte quota in the disk tier


@dataclass(frozen=True)
class KVTierConfig:
    """Everything kvtier reads from its configuration, checked."""

    chunk_tokens: int
    namespace: str
    no_cache_namespaces: str  # comma-separated: requests in these namespaces never load or store
    model_id: str  # "" = the engine's model name
    store_decode_tokens: bool
    memory: MemoryConfig
    disk: DiskConfig
    metrics: MetricsConfig
    remote: RemoteConfig
    encryption: EncryptionConfig
    admin: AdminConfig
    namespace_limits: dict[str, NamespaceLimits]  # from ``namespace_limits``
    signing: SigningConfig = SigningConfig(None, None)


@dataclass(frozen=True)
class LoadedConfig:
    """A config and, per dotted key, the layer that set it:
    ``"default"``, ``"file:<absolute path>"``, ``"extra_config"`` or ``"env:KVTIER_<...>"``."""

    config: KVTierConfig
    sources: dict[str, str]
    warnings: tuple[str, ...] = ()  # settings that were ignored, each with the reason


# ---- sizes ------------------------------------------------------------------------------------

_SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # Kubernetes quantities: k, M, G, T (powers of 1000) and Ki, Mi, Gi, Ti (powers of 1024)
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}
_SIZE_DISPLAY = ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int, key: str) -> int:
    """Return the number of bytes ``text`` names; raise ``ConfigError(key, ...)`` if it names none.

    Accepts a non-negative int, or a string: a number (a decimal point allowed) and an optional
    case-insensitive unit, space between optional: B; KB, MB, GB, TB (powers of 1000); KiB, MiB,
    GiB, TiB (powers of 1024); and Kubernetes' k, M, G, T and Ki, Mi, Gi, Ti (``4Gi``, ``100G``).
    A fractional byte count is rounded down. Zero is a valid size:
    callers that need a positive one check it.
    """
    try:
        return _size_bytes(text)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _size_bytes(value: object) -> int:
    """``parse_size`` without a key: raise ValueError with the reason."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size such as 2GiB or a byte count, got {_show(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, got {value}")
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use e.g. 2GiB, 512MiB, 1.5GB or a byte count)")
    return int(Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _format_size(num_bytes: int) -> str:
    """The shortest exact spelling of ``num_bytes``: ``2GiB``, ``1500MB`` or a plain byte count."""
    exact = [(num_bytes // _SIZE_UNITS[unit.lower()], unit) for unit in _SIZE_DISPLAY
             if num_bytes and num_bytes % _SIZE_UNITS[unit.lower()] == 0]
    if not exact:
        return str(num_bytes)
    count, unit = min(exact)
    return f"{count}{unit}"


# ---- checks: each takes a typed value and returns it checked, or raises ValueError ---------------

def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_show(value)}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _int_in(low: int, high: int | None, meaning: str) -> Callable[[object], int]:
    """A check that accepts an int in ``low..high`` (no upper bound if ``high`` is None)."""
    def check(value: object) -> int:
        number = _int(value)
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be {meaning}, got {number}")
        return number
    return check


def _str_matching(pattern: str, meaning: str) -> Callable[[object], str]:
    """A check that accepts a string that ``pattern`` matches in full."""
    def check(value: object) -> str:
        if not re.fullmatch(pattern, _str(value)):
            raise ValueError(f"must be {meaning}, got {value!r}")
        return _str(value)
    return check


def _one_of(*choices: str) -> Callable[[object], str]:
    return _str_matching("|".join(map(re.escape, choices)), "one of " + ", ".join(choices))


def _optional_str(value: object) -> str | None:
    """None and "" both mean "off" and come back as None."""
    return None if value is None else (_str(value) or None)


REMOTE_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "s3")


def _remote_url(value: object) -> str | None:
    """A remote tier URL of a known scheme whose ports (if given) are numbers in 1..65535; None
    ("" too) = no remote tier. Messages never show the URL's password."""
    url = _optional_str(value)
    if url is None:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{mask_url(url)!r} has an unknown scheme; expected one of "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    if scheme == "s3":
        return url
    hosts = rest.rpartition("@")[2].partition("/")[0].partition("?")[0]
    for node in filter(None, hosts.split(",")):
        host, colon, port = node.rpartition(":") if not node.endswith("]") else (node, "", "")
        if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{mask_url(url)!r}: port {port!r} of host {host!r} is not a number in 1..65535")
    return url


def _optional_env_name(value: object) -> str | None:
    """An environment variable's name, or None ("" too). ``KVTIER_*`` names are refused: those are
    kvtier's own configuration variables, and an unknown one stops start-up."""
    name = _optional_str(value)
    if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"must be an environment variable name (letters, digits, _), got {name!r}")
    if name is not None and name.startswith("KVTIER_"):
        raise ValueError(f"must not start with KVTIER_ (kvtier reads those as config keys), got {name!r}")
    return name


def parse_namespace_limits(text: str) -> dict[str, NamespaceLimits]:
    """``"tenant-a:ttl=3600,memory=1GiB,disk=10GiB;tenant-b:ttl=60"`` -> limits per namespace.

    Raises ValueError naming the part that is wrong."""
    limits: dict[str, NamespaceLimits] = {}
    for part in filter(None, (piece.strip() for piece in text.split(";"))):
        name, sep, fields = part.partition(":")
        if not sep or not is_namespace(name):
            raise ValueError(f"{part!r} must be <namespace>:<field>=<value>,... with a namespace of "
                             f"{NAMESPACE_RULE}")
        if name in limits:
            raise ValueError(f"namespace {name!r} is given twice")
        values = {"ttl": 0, "memory": 0, "disk": 0}
        for field_text in fields.split(","):
            field, eq, value = field_text.strip().partition("=")
            if not eq or field not in values:
                raise ValueError(f"{field_text.strip()!r} in {part!r}: fields are ttl=<seconds>, "
                                 f"memory=<size>, disk=<size>")
            values[field] = _int_from_text(value) if field == "ttl" else _size_bytes(value.strip())
            if values[field] < 0:
                raise ValueError(f"{field} of {name!r} must be >= 0")
        limits[name] = NamespaceLimits(values["ttl"], values["memory"], values["disk"])
    return limits


def _namespace_limits(value: object) -> str:
    text = _str(value)
    parse_namespace_limits(text)
    return text


def _positive_size(value: object) -> int:
    if _size_bytes(value) == 0:
        raise ValueError("must be > 0")
    return _size_bytes(value)


def _int_from_text(text: str) -> int:
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise ValueError(f"expected an integer, got {text!r}")
    return int(text)


def _bool_from_text(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.strip().lower() not in words:
        raise ValueError(f"expected true/false/1/0/yes/no, got {text!r}")
    return words[text.strip().lower()]


def _yaml_text(value: _Value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string or number is valid YAML


# ---- the keys -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Key:
    """One configuration key: its dotted name, default and how values of it are checked."""

    dotted: str
    default: _Value
    check: Callable[[object], _Value]  # typed value -> checked value; raises ValueError
    from_text: Callable[[str], object] = str  # environment string -> typed value; raises ValueError
    render: Callable[[_Value], str] = _yaml_text

    @property
    def env_var(self) -> str:
        return "KVTIER_" + self.dotted.replace(".", "_").upper()


def _render_size(value: _Value) -> str:
    return _format_size(_int(value))


def _render_secret(value: _Value) -> str:
    return "null" if value is None else '"***"'


def mask_url(url: str) -> str:
    """``url`` with the password of its user information replaced by ``***``, for messages, logs
    and ``kvtier config check`` (``redis://alice:hunter2@cache`` -> ``redis://alice:***@cache``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:***@{hosts}" if at and colon else url


def _render_url(value: _Value) -> str:
    return "null" if value is None else json.dumps(mask_url(str(value)))


_KEYS = (
    _Key("chunk_tokens", 256, _int_in(1, None, "> 0"), _int_from_text),
    _Key("namespace", "default", _str_matching(NAMESPACE_PATTERN, NAMESPACE_RULE)),
    _Key("no_cache_namespaces", "", _str_matching(f"({NAMESPACE_PATTERN}(,{NAMESPACE_PATTERN})*)?",
                                                  "a comma-separated list of namespaces, no spaces")),
    _Key("model_id", "", _str),
    _Key("store_decode_tokens", False, _bool, _bool_from_text),
    _Key("memory.capacity", 2 * 2**30, _positive_size, render=_render_size),
    _Key("memory.policy", "s3fifo", _one_of("lru", "s3fifo")),
    _Key("disk.path", None, _optional_str),
    _Key("disk.capacity", 16 * 2**30, _positive_size, render=_render_size),
    _Key("disk.write_policy", "write_through", _one_of("spill", "write_through")),
    _Key("disk.queue_depth", 256, _int_in(1, None, "> 0"), _int_from_text),
    _Key("metrics.port", 0, _int_in(0, 65535, "0 (off) or a port in 1..65535"), _int_from_text),
    _Key("metrics.host", "127.0.0.1", _str_matching(r"\S+", "a host name or address")),
    _Key("remote.url", None, _remote_url, render=_render_url),
    _Key("remote.ttl", 86400, _int_in(0, None, ">= 0 seconds (0 = never expire)"), _int_from_text),
    _Key("remote.timeout_ms", 2000, _int_in(1, None, "> 0 milliseconds"), _int_from_text),
    _Key("remote.queue_depth", 64, _int_in(1, None, "> 0"), _int_from_text),
    _Key("remote.username", None, _optional_str),
    _Key("remote.password", None, _optional_str, render=_render_secret),
    _Key("remote.tls_ca", None, _optional_str),
    _Key("remote.tls_cert", None, _optional_str),
    _Key("remote.tls_key", None, _optional_str),
    _Key("remote.s3_endpoint", None, _optional_str),
    _Key("remote.s3_region", None, _optional_str),
    _Key("remote.access_key", None, _optional_str),
    _Key("remote.secret_key", None, _optional_str, render=_render_secret),
    _Key("remote.compression", "none", _one_of("none", "cachegen")),
    _Key("remote.compression_bits", 6, _int_in(2, 8, "2..8"), _int_from_text),
    _Key("remote.handoff_wait_ms", 3000, _int_in(0, None, ">= 0 milliseconds"), _int_from_text),
    _Key("remote.cost_gate", True, _bool, _bool_from_text),
    _Key("encryption.key_file", None, _optional_str),
    _Key("encryption.key_env", None, _optional_env_name),
    _Key("namespace_limits", "", _namespace_limits),
    _Key("admin.port", 0, _int_in(0, 65535, "0 (off) or a port in 1..65535"), _int_from_text),
    _Key("admin.host", "127.0.0.1", _str_matching(r"\S+", "a host name or address")),
    _Key("admin.tokens_file", None, _optional_str),
    _Key("admin.audit_log", None, _optional_str),
    _Key("signing.key_file", None, _optional_str),
    _Key("signing.key_env", None, _optional_env_name),
    _Key("signing.unsigned", "refuse", _one_of("refuse", "default")),
)
_KEYS_BY_NAME = {key.dotted: key for key in _KEYS}
_KEYS_BY_ENV = {key.env_var: key for key in _KEYS}
_SECTIONS = ("memory", "disk", "metrics", "remote", "encryption", "admin", "signing")


# ---- loading ------------------------------------------------------------------------------------

def load_config(inline: Mapping[str, object], environ: Mapping[str, str]) -> LoadedConfig:
    """Merge defaults, the YAML file, ``inline`` and ``environ`` (later wins) into a checked config.

    ``inline`` is vLLM's ``kv_connector_extra_config``: config keys, nested or dotted, plus an
    optional ``config`` naming the YAML file (else ``environ["KVTIER_CONFIG"]``, else no file).
    Raises ConfigError naming the key and the source on an unknown key of the file or ``inline``,
    a wrong type or an impossible value; and with key ``config`` when the file is missing,
    unreadable, not YAML or not a mapping. ``KVTIER_*`` variables that are not config keys do not
    stop a start: Kubernetes service links (a Service named ``kvtier-redis`` gives every pod
    ``KVTIER_REDIS_PORT=tcp://...``) are ignored, any other is logged and listed in ``warnings``.
    """
    values: dict[str, _Value] = {key.dotted: key.default for key in _KEYS}
    sources = dict.fromkeys(values, "default")
    settings: list[tuple[str, object, str]] = []
    path = _config_path(inline, environ)
    if path is not None:
        settings += _settings_from_mapping(_read_yaml(path), f"file:{path}")
    settings += _settings_from_mapping({k: v for k, v in inline.items() if k != "config"}, "extra_config")
    from_env, warnings = _settings_from_env(environ)
    settings += from_env
    for warning in warnings:
        logger.warning("kvtier: %s", warning)
    for dotted, value, source in settings:
        try:
            values[dotted] = _KEYS_BY_NAME[dotted].check(value)
        except ValueError as exc:
            raise ConfigError(dotted, f"{exc} (from {source})") from None
        sources[dotted] = source
    return LoadedConfig(_build(values), sources, tuple(warnings))


def describe(loaded: LoadedConfig) -> list[tuple[str, str, str]]:
    """One row per key, in reference order: (dotted key, value as YAML text, source).

    Sizes are written in the unit that spells them shortest (``2GiB``), strings in double quotes.
    """
    values = _values_of(loaded.config)
    return [(key.dotted, key.render(values[key.dotted]), loaded.sources[key.dotted]) for key in _KEYS]


def _config_path(inline: Mapping[str, object], environ: Mapping[str, str]) -> str | None:
    """Absolute path of the YAML file: inline ``config``, else ``KVTIER_CONFIG``; None/"" = none."""
    named = (("extra_config", inline.get("config")), ("env:KVTIER_CONFIG", environ.get("KVTIER_CONFIG")))
    for origin, value in named:
        if value is not None and not isinstance(value, str):
            raise ConfigError("config", f"expected a file path, got {_show(value)} (from {origin})")
        if value:
            return os.path.abspath(value)
    return None


def _read_yaml(path: str) -> Mapping[object, object]:
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
        raise ConfigError("config", f"{path} must hold a mapping of keys, got {_show(data)}")
    return data


def _settings_from_mapping(mapping: Mapping[object, object], source: str) -> list[tuple[str, object, str]]:
    """(dotted key, raw value, source) for each key of a nested and/or dotted mapping.

    Raises ConfigError for an unknown key, a non-string key, a section that is not a mapping, or
    a key given twice (once nested, once dotted).
    """
    settings: dict[str, object] = {}
    for name, value in mapping.items():
        dotted = _key_name(name, source)
        pairs = [(dotted, value)]
        if dotted in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(dotted, f"expected a mapping of {dotted}.* keys, got {_show(value)} "
                                          f"(from {source})")
            pairs = [(f"{dotted}.{_key_name(sub, source)}", sub_value) for sub, sub_value in value.items()]
        for full, sub_value in pairs:
            if full not in _KEYS_BY_NAME:
                raise ConfigError(full, f"unknown key (from {source})"
                                        f"{_did_you_mean(full, [*_KEYS_BY_NAME, *_SECTIONS])}")
            if full in settings:
                raise ConfigError(full, f"given twice, nested and dotted (from {source})")
            settings[full] = sub_value
    return [(dotted, value, source) for dotted, value in settings.items()]


# What Kubernetes injects for a Service whose name starts with "kvtier" (e.g. kvtier-redis):
# <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORT NAME>], <NAME>_PORT and <NAME>_PORT_<n>_<PROTO>[_*].
_SERVICE_LINK = re.compile(r"KVTIER(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT"
                           r"|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)")


def _settings_from_env(environ: Mapping[str, str]) -> tuple[list[tuple[str, object, str]], list[str]]:
    """(dotted key, typed value, source) for each ``KVTIER_*`` variable but ``KVTIER_CONFIG``, and
    a warning for each variable that names no key (Kubernetes service links are skipped quietly)."""
    settings: list[tuple[str, object, str]] = []
    warnings: list[str] = []
    for name in sorted(n for n in environ if n.startswith("KVTIER_") and n != "KVTIER_CONFIG"):
        source = f"env:{name}"
        key = _KEYS_BY_ENV.get(name)
        if key is not None and _SERVICE_LINK.fullmatch(name) and re.match(r"(tcp|udp|sctp)://", environ[name]):
            warnings.append(f"ignoring {name}={environ[name]}: a Kubernetes service link, not the setting "
                            f"{key.dotted} (rename the Service, or set {key.dotted} in the config file)")
            continue
        if key is None:
            if not _SERVICE_LINK.fullmatch(name):
                warnings.append(f"ignoring environment variable {name}: it is not a kvtier setting"
                                f"{_did_you_mean(name, list(_KEYS_BY_ENV))}")
            continue
        try:
            settings.append((key.dotted, key.from_text(environ[name]), source))
        except ValueError as exc:
            raise ConfigError(key.dotted, f"{exc} (from {source})") from None
    return settings, warnings


def _key_name(name: object, source: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(str(name), f"keys must be strings, got {_show(name)} (from {source})")
    return name


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _build(values: Mapping[str, _Value]) -> KVTierConfig:
    """The config from checked values (each already of its key's type)."""
    def num(key: str) -> int:
        return _int(values[key])

    def text(key: str) -> str:
        return _str(values[key])

    def optional(key: str) -> str | None:
        value = values[key]
        return None if value is None else _str(value)

    disk_path = values["disk.path"]
    return KVTierConfig(
        chunk_tokens=num("chunk_tokens"), namespace=text("namespace"), model_id=text("model_id"),
        no_cache_namespaces=text("no_cache_namespaces"),
        store_decode_tokens=_bool(values["store_decode_tokens"]),
        memory=MemoryConfig(capacity_bytes=num("memory.capacity"), policy=text("memory.policy")),
        disk=DiskConfig(path=None if disk_path is None else _str(disk_path),
                        capacity_bytes=num("disk.capacity"), write_policy=text("disk.write_policy"),
                        queue_depth=num("disk.queue_depth")),
        metrics=MetricsConfig(port=num("metrics.port"), host=text("metrics.host")),
        remote=RemoteConfig(
            url=optional("remote.url"), ttl_s=num("remote.ttl"), timeout_ms=num("remote.timeout_ms"),
            queue_depth=num("remote.queue_depth"), username=optional("remote.username"),
            password=optional("remote.password"), tls_ca=optional("remote.tls_ca"),
            tls_cert=optional("remote.tls_cert"), tls_key=optional("remote.tls_key"),
            s3_endpoint=optional("remote.s3_endpoint"), s3_region=optional("remote.s3_region"),
            access_key=optional("remote.access_key"), secret_key=optional("remote.secret_key"),
            compression=text("remote.compression"), compression_bits=num("remote.compression_bits"),
            handoff_wait_ms=num("remote.handoff_wait_ms"), cost_gate=_bool(values["remote.cost_gate"])),
        encryption=EncryptionConfig(key_file=optional("encryption.key_file"),
                                    key_env=optional("encryption.key_env")),
        admin=AdminConfig(port=num("admin.port"), host=text("admin.host"),
                          tokens_file=optional("admin.tokens_file"), audit_log=optional("admin.audit_log")),
        namespace_limits=parse_namespace_limits(text("namespace_limits")),
        signing=SigningConfig(key_file=optional("signing.key_file"), key_env=optional("signing.key_env"),
                              unsigned=text("signing.unsigned")),
    )


def _values_of(config: KVTierConfig) -> dict[str, _Value]:
    """The inverse of ``_build``: dotted key -> value."""
    return {
        "chunk_tokens": config.chunk_tokens, "namespace": config.namespace, "model_id": config.model_id,
        "no_cache_namespaces": config.no_cache_namespaces,
        "store_decode_tokens": config.store_decode_tokens,
        "memory.capacity": config.memory.capacity_bytes, "memory.policy": config.memory.policy,
        "disk.path": config.disk.path, "disk.capacity": config.disk.capacity_bytes,
        "disk.write_policy": config.disk.write_policy, "disk.queue_depth": config.disk.queue_depth,
        "metrics.port": config.metrics.port, "metrics.host": config.metrics.host,
        "remote.url": config.remote.url, "remote.ttl": config.remote.ttl_s,
        "remote.timeout_ms": config.remote.timeout_ms, "remote.queue_depth": config.remote.queue_depth,
        "remote.username": config.remote.username, "remote.password": config.remote.password,
        "remote.tls_ca": config.remote.tls_ca, "remote.tls_cert": config.remote.tls_cert,
        "remote.tls_key": config.remote.tls_key, "remote.s3_endpoint": config.remote.s3_endpoint,
        "remote.s3_region": config.remote.s3_region, "remote.access_key": config.remote.access_key,
        "remote.secret_key": config.remote.secret_key, "remote.compression": config.remote.compression,
        "remote.compression_bits": config.remote.compression_bits,
        "remote.handoff_wait_ms": config.remote.handoff_wait_ms, "remote.cost_gate": config.remote.cost_gate,
        "encryption.key_file": config.encryption.key_file, "encryption.key_env": config.encryption.key_env,
        "namespace_limits": _render_limits(config.namespace_limits),
        "admin.port": config.admin.port, "admin.host": config.admin.host,
        "admin.tokens_file": config.admin.tokens_file, "admin.audit_log": config.admin.audit_log,
        "signing.key_file": config.signing.key_file, "signing.key_env": config.signing.key_env,
        "signing.unsigned": config.signing.unsigned,
    }


def _render_limits(limits: Mapping[str, NamespaceLimits]) -> str:
    return ";".join(f"{name}:ttl={item.ttl_s},memory={_format_size(item.memory_bytes)},"
                    f"disk={_format_size(item.disk_bytes)}" for name, item in limits.items())
