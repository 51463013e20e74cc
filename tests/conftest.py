"""Shared fixtures: the tiny test model is built once per session (about 10 s)."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kvtier.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
