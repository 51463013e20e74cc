"""Shared fixtures: the tiny test model is built once per session (about 10 s).

A crash of the test process itself (a segfault in a C extension) is written, with the stack of
every thread, to ``out/test-faults.log``; ``.ci/run`` prints it when the suite fails. (pytest's
own faulthandler plugin is off: its output can be lost with the captured output of the test
that crashed.)
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest

from kvtier.bench.server import free_port as kvtier_free_port


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kvtier.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny"))


def free_port() -> int:
    """A free loopback port outside the ephemeral range (see ``kvtier.bench.server.free_port``)."""
    return kvtier_free_port()


os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

FAULT_LOG = Path(__file__).resolve().parents[1] / "out" / "test-faults.log"
FAULT_LOG.parent.mkdir(exist_ok=True)
_fault_file = open(FAULT_LOG, "w")  # noqa: SIM115 (open for the whole session)
faulthandler.enable(_fault_file, all_threads=True)
