"""The audit log: one JSON object per line, appended and flushed per event.

Every admin action (its outcome included) and every denied request is recorded with: ``time``
(UTC, ISO 8601), ``client`` (address), ``token_id`` (never the token), ``role``, ``method``,
``path``, ``status`` (the HTTP status answered), and what the action did (``detail``). Without
a file (``admin.audit_log`` unset) the lines go to the ``kvtier.audit`` logger.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections.abc import Mapping

from kvtier.errors import ConfigError

logger = logging.getLogger("kvtier.audit")


class AuditLog:
    """Appends events to a JSON-lines file (created ``0600``); safe from any thread."""

    def __init__(self, path: str | None) -> None:
        """Raises ``ConfigError("admin.audit_log", ...)`` when the file cannot be opened."""
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise ConfigError("admin.audit_log", f"cannot open {path}: {exc.strerror or exc}") from None

    def record(self, event: Mapping[str, object]) -> None:
        """Append ``event`` (JSON-serialisable values) with the current time. A failed write is
        logged, never raised: the request it records has already been answered."""
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **event},
                          sort_keys=True, separators=(",", ":"))
        with self._lock:
            if self._fd is None:
                logger.info("%s", line)
                return
            try:
                os.write(self._fd, (line + "\n").encode("utf-8"))
            except OSError as exc:
                logger.error("kvtier: audit log %s write failed: %s; event: %s", self.path, exc, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
