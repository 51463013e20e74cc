"""Bearer tokens with roles, for the admin API.

The tokens file (``admin.tokens_file``) holds one token per line: ``<role> <token>``, role
``read`` (health, stats, lookup, namespaces) or ``admin`` (everything, including invalidation and
limits); ``#`` starts a comment. A token is at least ``MIN_TOKEN_CHARS`` printable characters
(``openssl rand -hex 32`` makes a good one). Only SHA-256 digests of the tokens are kept in
memory, compared in constant time; logs and the audit log name a token by ``token_id`` (the
first 12 hex digits of its digest), never by its value.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import stat
from dataclasses import dataclass

from kvtier.errors import ConfigError

logger = logging.getLogger("kvtier")

MIN_TOKEN_CHARS = 16
_MAX_FILE_BYTES = 1 << 20


class Role(enum.IntEnum):
    READ = 1
    ADMIN = 2


@dataclass(frozen=True)
class Principal:
    """Who made a request: the role of its token and the token's id."""

    role: Role
    token_id: str


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


class Tokens:
    """The accepted tokens and their roles."""

    def __init__(self, tokens: dict[str, Role]) -> None:
        """``tokens``: token -> role. ValueError when one is shorter than ``MIN_TOKEN_CHARS``."""
        short = [token_id(token) for token in tokens if len(token) < MIN_TOKEN_CHARS]
        if short:
            raise ValueError(f"tokens {short} are shorter than {MIN_TOKEN_CHARS} characters")
        self._digests = [(hashlib.sha256(token.encode("utf-8")).digest(), role, token_id(token))
                         for token, role in tokens.items()]

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization: Bearer <token>`` header; None when the header is
        missing, malformed or names no known token. Every known token is compared, always."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode("utf-8", errors="replace")).digest()
        found: Principal | None = None
        for known, role, ident in self._digests:
            if hmac.compare_digest(digest, known):
                found = Principal(role, ident)
        return found


def load_tokens(path: str | None) -> Tokens:
    """The tokens of ``admin.tokens_file``. Raises ``ConfigError("admin.tokens_file", ...)`` when
    it is unset, unreadable, empty or malformed (messages never quote a token)."""
    if not path:
        raise ConfigError("admin.tokens_file", "the admin API needs a tokens file (lines '<role> <token>', "
                                               "role read or admin); there is no unauthenticated mode")
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
            mode = os.fstat(file.fileno()).st_mode
    except OSError as exc:
        raise ConfigError("admin.tokens_file", f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError("admin.tokens_file", f"{path} is larger than {_MAX_FILE_BYTES} bytes")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("kvtier: admin tokens file %s is readable by group or others; chmod 600 it", path)
    tokens: dict[str, Role] = {}
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("read", "admin"):
            raise ConfigError("admin.tokens_file", f"{path} line {number}: expected '<read|admin> <token>'")
        if len(parts[1]) < MIN_TOKEN_CHARS:
            raise ConfigError("admin.tokens_file", f"{path} line {number}: the token is shorter than "
                                                   f"{MIN_TOKEN_CHARS} characters (make one with openssl rand -hex 32)")
        tokens[parts[1]] = Role.ADMIN if parts[0] == "admin" else Role.READ
    if not tokens:
        raise ConfigError("admin.tokens_file", f"{path} holds no tokens")
    return Tokens(tokens)
