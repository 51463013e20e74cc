"""KV layout byte math and refusal of unknown layouts."""

from __future__ import annotations

import pytest

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout


def test_byte_math_of_smollm2() -> None:
    layout = KVLayout("cpu_lbhnc", 30, 3, 64, 128, "bfloat16")
    assert layout.bytes_per_token == 30 * 3 * 64 * 2 * 2 == 23040
    assert layout.chunk_bytes(256) == 256 * 23040
    assert layout.blocks_per_chunk(256) == 2


def test_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(LayoutError, match="flashinfer_hnd"):
        KVLayout("flashinfer_hnd", 4, 2, 64, 16, "bfloat16")


def test_chunk_must_be_a_multiple_of_the_block() -> None:
    with pytest.raises(LayoutError, match="multiple"):
        KVLayout("cpu_lbhnc", 4, 2, 64, 128, "bfloat16").chunk_bytes(200)


def test_fingerprint_distinguishes_layouts() -> None:
    a = KVLayout("cpu_lbhnc", 4, 2, 64, 128, "bfloat16")
    assert a.fingerprint() == KVLayout("cpu_lbhnc", 4, 2, 64, 128, "bfloat16").fingerprint()
    assert a.fingerprint() != KVLayout("cpu_lbhnc", 4, 2, 64, 256, "bfloat16").fingerprint()
