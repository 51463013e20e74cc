"""kvtier installs into a fresh virtual environment without vLLM or torch, and its engine-neutral
core imports there (the vLLM integration is an extra; the plugin entry point is declared)."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import importlib.metadata as md, kvtier, kvtier.config, kvtier.store, kvtier.manager, kvtier.transfers
import kvtier.tiers.disk, kvtier.compression, kvtier.crypto
import sys
assert "torch" not in sys.modules and "vllm" not in sys.modules, "the core must not import torch or vllm"
plugins = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "kvtier"]
assert plugins and plugins[0].value == "kvtier.integrations.vllm.plugin:register", plugins
print("ok", kvtier.__version__)
"""


def test_base_install_without_vllm_imports_the_core(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.startswith("ok ")
    version = subprocess.run([str(env_dir / "bin" / "kvtier"), "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip() == f"kvtier {check.stdout.split()[1]}"
