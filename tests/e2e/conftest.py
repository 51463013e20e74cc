"""End-to-end fixtures.

The engines these tests start store every chunk at first sight (``admission.policy: always``):
the tests check which chunks reach which tier, and the default ``adaptive`` rule stops storing
first-seen chunks once it has measured low reuse, which a test's own traffic (each prompt stored
once, then read back by another engine) can look like. The rule itself is tested in
tests/unit/test_admission.py and measured by ``kvtier bench lowreuse`` (docs/benchmarking.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package", autouse=True)
def store_every_chunk() -> Iterator[None]:
    before = os.environ.get("KVTIER_ADMISSION_POLICY")
    os.environ["KVTIER_ADMISSION_POLICY"] = "always"  # inherited by every engine subprocess
    yield
    if before is None:
        os.environ.pop("KVTIER_ADMISSION_POLICY", None)
    else:
        os.environ["KVTIER_ADMISSION_POLICY"] = before
