"""`kvtier demo --tiny --quick` end to end: two real vLLM servers, the tiny model, results on disk."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_runs_both_configurations(tiny_model: str, tmp_path: Path) -> None:
    # The tiny model fixture lives in <models dir>/tiny, where the demo looks for it.
    models_dir = Path(tiny_model).parent
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli", "demo", "--tiny", "--quick",
                           "--models-dir", str(models_dir), "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "ttft_per_round.png").stat().st_size > 0
    assert results["num_users"] == 3 and results["num_rounds"] == 2
    configurations = results["configurations"]
    assert set(configurations) == {"baseline", "kvtier"}
    for name, run in configurations.items():
        assert run["error"] is None, name
        ttfts = [request["ttft_s"] for request in run["requests"]]
        assert len(ttfts) == 3 * 2, name
        assert all(math.isfinite(t) and t > 0 for t in ttfts), name
        assert math.isfinite(run["ttft_s"]["mean"]), name
    # The demo's premise: vLLM's own cache lost each user's context between turns ...
    baseline_later = [r for r in configurations["baseline"]["requests"] if r["round"] == 2]
    assert all(r["num_cached_tokens"] < 256 for r in baseline_later)
    # ... and kvtier brought it back (at least the document's whole 256-token chunks).
    kvtier_later = [r for r in configurations["kvtier"]["requests"] if r["round"] == 2]
    assert all(r["num_cached_tokens"] >= 1024 for r in kvtier_later)
    assert configurations["kvtier"]["kvtier_metrics"]["kvtier_hits_total"]["memory"] > 0
    assert "Time to first token" in proc.stdout
