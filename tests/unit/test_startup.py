"""Scheduler-side start-up: a metrics port that is taken is reported, not a crash."""

from __future__ import annotations

import logging
import socket

from kvtier.config import load_config
from kvtier.integrations.vllm.setup import EngineSetup
from kvtier.integrations.vllm.startup import serve_metrics
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics

LAYOUT = KVLayout("cpu_lbhnc", 2, 1, 8, 16, "bfloat16")


def test_a_taken_metrics_port_is_reported_and_the_engine_goes_on(caplog) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config({"metrics": {"port": port}}, {}).config
        setup = EngineSetup(config, LAYOUT, Namespace("default", "m", LAYOUT.fingerprint(), 1), ("l0", "l1"), 1,
                            LAYOUT.chunk_bytes(256), 4, None, 0)
        with caplog.at_level(logging.ERROR, logger="kvtier"):
            serve_metrics(Metrics(), setup)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text and "metrics.port" in caplog.text
