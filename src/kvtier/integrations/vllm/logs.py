"""kvtier's log lines through vLLM's logging, inside vLLM's processes.

kvtier logs to the ``kvtier`` logger (and its children, ``kvtier.tiers.remote`` ...), which has no
handler of its own: in a vLLM process its INFO lines (``kvtier: metrics on http://...``) would be
dropped by Python's last-resort handler, and its warnings printed without vLLM's format. vLLM's
plugin hook (``plugin.register``, called in every vLLM process) calls ``adopt_vllm_logging``: the
``kvtier`` logger then hands every record to vLLM's ``vllm`` logger, so kvtier's lines carry
vLLM's format (process, pid, level, time, file), go to vLLM's stream, and follow its level
(``VLLM_LOGGING_LEVEL``), its JSON formatter and a ``VLLM_LOGGING_CONFIG_PATH`` file, as they
are when the record is logged (vLLM 0.32 configures logging after loading plugins, 0.26 when
``vllm.logger`` is imported: the decision is taken per record, not at start-up). Left alone:
processes where vLLM does not configure logging (``VLLM_CONFIGURE_LOGGING=0``: the application
does, and kvtier propagates like any library), and a ``kvtier`` logger the application gave
handlers of its own.
"""

from __future__ import annotations

import logging
import os

KVTIER_LOGGER = "kvtier"
VLLM_LOGGER = "vllm"


class ToVllmHandler(logging.Handler):
    """Passes each record to the ``vllm`` logger's handlers (its level and filters applied)."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(VLLM_LOGGER)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def adopt_vllm_logging() -> bool:
    """Route the ``kvtier`` logger into vLLM's (see the module docstring). Returns whether it did;
    idempotent."""
    ours = logging.getLogger(KVTIER_LOGGER)
    if any(isinstance(handler, ToVllmHandler) for handler in ours.handlers):
        return True
    if ours.handlers or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return False
    ours.addHandler(ToVllmHandler())
    ours.setLevel(logging.DEBUG)  # vLLM's level, whatever it is when a record comes, decides (ToVllmHandler)
    ours.propagate = False  # vLLM's own logger does not propagate either: one line per record
    return True
