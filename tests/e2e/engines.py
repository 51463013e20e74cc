"""Start an engine subprocess (``engine_driver.py``) and collect its JSON results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("engine_driver.py")


def run_engine(spec: dict, workdir: Path, name: str, timeout_s: float = 900) -> list:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{name}.log"
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", PYTHONHASHSEED=str(sum(map(ord, name))))  # differs per engine: keys must not care
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(DRIVER), str(spec_path)], stdout=subprocess.PIPE,
                              stderr=log, text=True, timeout=timeout_s, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text()[-4000:]
        raise AssertionError(f"engine {name} failed (rc={proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def metric(text: str, name: str, tier: str | None = None) -> float:
    """Value of one sample in Prometheus text exposition (0 if absent)."""
    label = f'{{tier="{tier}"}}' if tier else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{label} "):
            return float(line.split()[-1])
    return 0.0
