"""Shared fixtures: the tiny test model is built once per session (about 10 s)."""

from __future__ import annotations

import os

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
