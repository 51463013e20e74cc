"""Typed errors of kvtier, all in one place.

Bad input and bad configuration raise one of these; internal invariants use ``assert``.
At a tier boundary a miss is a value (``None`` or ``False``), not an exception: I/O failures
are turned into misses plus a metric by the caller that owns the tier.
"""


class KVTierError(Exception):
    """Base of every error kvtier raises on purpose."""


class ConfigError(KVTierError):
    """A configuration key is unknown, has the wrong type or an impossible value.

    The message always names the key (dotted, e.g. ``memory.capacity``) and its source.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class LayoutError(KVTierError):
    """The engine's KV memory layout is one kvtier does not know (or does not match the plan)."""


class EntryError(KVTierError):
    """Bytes read from a tier are not a valid entry: bad magic, version, key, layout,
    length or checksum. Callers turn it into a miss and count it."""


class UnreadableEntryError(EntryError):
    """A well-formed entry this kvtier cannot open: sealed under another master key (or altered
    so that it does not authenticate), or written with another encryption or compression
    setting. A miss, counted, but left in place: a reader with the wrong key must not wipe the
    entries of everyone else."""


class ModelError(KVTierError):
    """A model folder cannot be built or used (missing package, half-written folder)."""


class ServerError(KVTierError):
    """An engine server did not start, exited early, or answered a request with an error.

    The message names the server and, where there is one, its log file.
    """


class TokenError(KVTierError):
    """A signed token (``kvtier.signing``: a namespace token or a handoff) is not valid. The
    message never quotes the token or the key."""


class MalformedTokenError(TokenError):
    """The text is not a token of the expected kind (wrong prefix, fields, characters or length)."""


class BadSignatureError(TokenError):
    """The token is well formed but its MAC does not match: altered, or signed with another key."""


class ExpiredTokenError(TokenError):
    """The token's signature is good but its expiry time has passed."""
