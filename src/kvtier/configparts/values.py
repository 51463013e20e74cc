"""The values of config keys: checks, sizes, namespaces and their limits, remote URLs.

Every check takes a typed value and returns it checked, or raises ``ValueError`` with the reason;
``kvtier.config`` turns the reason into a ``ConfigError`` naming the key and the source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from kvtier.errors import ConfigError

Value = int | str | bool | None  # a checked value of one key

# A tenant namespace, in config, request controls, disk paths and object names: never "." or "..".
NAMESPACE_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}"
NAMESPACE_RULE = "1 to 64 of A-Z a-z 0-9 _ . -, not starting with ."


def is_namespace(name: object) -> bool:
    """Whether ``name`` is a valid tenant namespace (safe as a path component and object name)."""
    return isinstance(name, str) and re.fullmatch(NAMESPACE_PATTERN, name) is not None


@dataclass(frozen=True)
class NamespaceLimits:
    """Limits of one tenant namespace; 0 = no limit."""

    ttl_s: int = 0  # entries older than this are misses and are removed (memory, disk; Redis EX)
    memory_bytes: int = 0  # byte quota in the memory tier
    disk_bytes: int = 0  # byte quota in the disk tier


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
        return size_bytes(text)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def size_bytes(value: object) -> int:
    """``parse_size`` without a key: raise ValueError with the reason."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size such as 2GiB or a byte count, got {show(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative, got {value}")
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use e.g. 2GiB, 512MiB, 1.5GB or a byte count)")
    return int(Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(num_bytes: int) -> str:
    """The shortest exact spelling of ``num_bytes``: ``2GiB``, ``1500MB`` or a plain byte count."""
    exact = [(num_bytes // _SIZE_UNITS[unit.lower()], unit) for unit in _SIZE_DISPLAY
             if num_bytes and num_bytes % _SIZE_UNITS[unit.lower()] == 0]
    if not exact:
        return str(num_bytes)
    count, unit = min(exact)
    return f"{count}{unit}"


# ---- checks: each takes a typed value and returns it checked, or raises ValueError ---------------

def show(value: object) -> str:
    """``value``'s type and a repr cut to 60 characters, for messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {show(value)}")
    return value


def check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def check_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def int_in(low: int, high: int | None, meaning: str) -> Callable[[object], int]:
    """A check that accepts an int in ``low..high`` (no upper bound if ``high`` is None)."""
    def check(value: object) -> int:
        number = check_int(value)
        if number < low or (high is not None and number > high):
            raise ValueError(f"must be {meaning}, got {number}")
        return number
    return check


def str_matching(pattern: str, meaning: str) -> Callable[[object], str]:
    """A check that accepts a string that ``pattern`` matches in full."""
    def check(value: object) -> str:
        if not re.fullmatch(pattern, check_str(value)):
            raise ValueError(f"must be {meaning}, got {value!r}")
        return check_str(value)
    return check


def one_of(*choices: str) -> Callable[[object], str]:
    return str_matching("|".join(map(re.escape, choices)), "one of " + ", ".join(choices))


def optional_str(value: object) -> str | None:
    """None and "" both mean "off" and come back as None."""
    return None if value is None else (check_str(value) or None)


def positive_size(value: object) -> int:
    if size_bytes(value) == 0:
        raise ValueError("must be > 0")
    return size_bytes(value)


REMOTE_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "s3")


def remote_url(value: object) -> str | None:
    """A remote tier URL of a known scheme whose ports (if given) are numbers in 1..65535; None
    ("" too) = no remote tier. Messages never show the URL's password."""
    url = optional_str(value)
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


def mask_url(url: str) -> str:
    """``url`` with the password of its user information replaced by ``***``, for messages, logs
    and ``kvtier config check`` (``redis://alice:hunter2@cache`` -> ``redis://alice:***@cache``)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:***@{hosts}" if at and colon else url


def optional_address(value: object) -> str | None:
    """``host:port`` (port 1..65535; an IPv6 host in brackets), or None ("" too)."""
    address = optional_str(value)
    if address is not None:
        check_address(address)
    return address


def check_address(address: str) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)``; ValueError otherwise."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in host):
        raise ValueError(f"{address!r} is not host:port with a port in 1..65535")
    return host.strip("[]"), int(port)


def address_list(value: object) -> str:
    """Comma-separated ``host:port`` addresses, no spaces ("" = none)."""
    text = check_str(value)
    for address in filter(None, text.split(",")):
        check_address(address)
    if text and "" in text.split(","):
        raise ValueError(f"{text!r} has an empty entry; write host:port,host:port")
    return text


def optional_redis_url(value: object) -> str | None:
    """A ``redis://`` or ``rediss://`` URL of one server, or None ("" too)."""
    url = remote_url(value)
    if url is not None and url.partition("://")[0] not in ("redis", "rediss"):
        raise ValueError(f"{mask_url(url)!r} must be a redis:// or rediss:// URL of one server")
    return url


def optional_env_name(value: object) -> str | None:
    """An environment variable's name, or None ("" too). ``KVTIER_*`` names are refused: those are
    kvtier's own configuration variables, and an unknown one stops start-up."""
    name = optional_str(value)
    if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"must be an environment variable name (letters, digits, _), got {name!r}")
    if name is not None and name.startswith("KVTIER_"):
        raise ValueError(f"must not start with KVTIER_ (kvtier reads those as config keys), got {name!r}")
    return name


# ---- namespace limits ---------------------------------------------------------------------------

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
            values[field] = int_from_text(value) if field == "ttl" else size_bytes(value.strip())
            if values[field] < 0:
                raise ValueError(f"{field} of {name!r} must be >= 0")
        limits[name] = NamespaceLimits(values["ttl"], values["memory"], values["disk"])
    return limits


def namespace_limits(value: object) -> str:
    """A check: the text of ``namespace_limits``, if ``parse_namespace_limits`` accepts it."""
    text = check_str(value)
    parse_namespace_limits(text)
    return text


def render_limits(limits: Mapping[str, NamespaceLimits]) -> str:
    """The inverse of ``parse_namespace_limits`` (sizes in their shortest exact spelling)."""
    return ";".join(f"{name}:ttl={item.ttl_s},memory={format_size(item.memory_bytes)},"
                    f"disk={format_size(item.disk_bytes)}" for name, item in limits.items())


# ---- environment text and YAML text -------------------------------------------------------------

def int_from_text(text: str) -> int:
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise ValueError(f"expected an integer, got {text!r}")
    return int(text)


def bool_from_text(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.strip().lower() not in words:
        raise ValueError(f"expected true/false/1/0/yes/no, got {text!r}")
    return words[text.strip().lower()]


def yaml_text(value: Value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a JSON string or number is valid YAML


def render_size(value: Value) -> str:
    return format_size(check_int(value))


def render_secret(value: Value) -> str:
    return "null" if value is None else '"***"'


def render_url(value: Value) -> str:
    return "null" if value is None else json.dumps(mask_url(str(value)))
