"""Start an engine subprocess (``engine_driver.py``) and collect its JSON results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DRIVER = Path(__file__).with_name("engine_driver.py")


class Engine:
    """An engine subprocess running a driver spec; ``result()`` waits for it and parses its output."""

    def __init__(self, spec: dict, workdir: Path, name: str) -> None:
        self.name = name
        spec_path = workdir / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = workdir / f"{name}.log"
        # PYTHONHASHSEED differs per engine: kvtier's keys must not care
        env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", PYTHONHASHSEED=str(sum(map(ord, name))))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(DRIVER), str(spec_path)], stdout=subprocess.PIPE,
                                         stderr=log, text=True, env=env)

    def result(self, timeout_s: float = 900) -> list:
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"engine {self.name} timed out:\n{self.log_path.read_text()[-4000:]}") from None
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if self.proc.returncode != 0 or not lines:
            tail = self.log_path.read_text()[-4000:]
            raise AssertionError(f"engine {self.name} failed (rc={self.proc.returncode}):\n{tail}")
        return json.loads(lines[-1][len("RESULT "):])


def run_engine(spec: dict, workdir: Path, name: str, timeout_s: float = 900) -> list:
    return Engine(spec, workdir, name).result(timeout_s)


def wait_for(path: Path, timeout_s: float = 600, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(poll_s)


def metric(text: str, name: str, tier: str | None = None) -> float:
    """Value of one sample in Prometheus text exposition (0 if absent)."""
    label = f'{{tier="{tier}"}}' if tier else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{label} "):
            return float(line.split()[-1])
    return 0.0
