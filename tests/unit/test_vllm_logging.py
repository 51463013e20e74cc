"""kvtier's log lines inside vLLM's processes go through vLLM's logging (``integrations/vllm/logs.py``).

Each case runs in a fresh interpreter, as a vLLM 0.32 process starts: vLLM's plugin hook (kvtier's
``register``) runs, then vLLM applies its logging configuration (from the environment here), then
kvtier logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

SCRIPT = """
import logging
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging
from kvtier.integrations.vllm.plugin import register
register()
configure_logging(LoggingConfig())
logging.getLogger("kvtier").info("kvtier: metrics on http://127.0.0.1:1/metrics")
logging.getLogger("kvtier.tiers.remote").warning("kvtier: remote tier unhealthy")
logging.getLogger("kvtier").debug("kvtier: a debug line")
"""


def run(env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def line_of(output: str, text: str) -> str:
    found = [line for line in output.splitlines() if text in line]
    assert len(found) == 1, output
    return found[0]


@pytest.mark.parametrize(("level", "shown"), [("INFO", ("metrics on", "unhealthy")), ("WARNING", ("unhealthy",))])
def test_lines_appear_in_vllms_format_at_vllms_level(level: str, shown: tuple[str, ...]) -> None:
    output = run({"VLLM_LOGGING_LEVEL": level, "VLLM_LOGGING_COLOR": "0"})
    for text in ("metrics on", "unhealthy", "a debug line"):
        assert (text in output) == (text in shown), (level, text, output)
    # vLLM's format: "(Process pid=N) LEVEL date time [file:line] message"
    assert re.search(r"pid=\d+\) WARNING \S+ \S+ \[\S+:\d+\] kvtier: remote tier unhealthy",
                     line_of(output, "unhealthy"))
    if level == "INFO":
        assert re.search(r"pid=\d+\) INFO \S+ \S+ \[\S+:\d+\] kvtier: metrics on", line_of(output, "metrics on"))


def test_left_alone_when_vllm_does_not_configure_logging() -> None:
    output = run({"VLLM_CONFIGURE_LOGGING": "0"})
    assert "metrics on" not in output  # a library's INFO line, with no handler configured
    assert "remote tier unhealthy" in output  # Python's last-resort handler prints warnings
    assert " WARNING " not in output
