"""A frozen description of the engine's paged KV memory, and the byte math that follows from it.

No torch here: the worker-side data path (``kvtier.datapath``) checks real tensors against a
``KVLayout``; everything above it only needs the numbers.

Kinds we know:
- ``cpu_lbhnc``: vLLM-CPU. One tensor per layer, shape [num_blocks, num_kv_heads, block_size,
  2*head_size]; one (block, head) page holds K transposed then V. A block of one layer is one
  contiguous page of ``num_kv_heads * block_size * 2 * head_size`` elements.
- ``cuda_flash``: vLLM CUDA FlashAttention. One tensor per layer, shape [2, num_blocks, block_size,
  num_kv_heads, head_size]; a block of one layer is two pages (K and V) of
  ``block_size * num_kv_heads * head_size`` elements each.
Any other kind is refused at start-up (``LayoutError`` naming it): never silent zero hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from kvtier.errors import LayoutError

KNOWN_KINDS = ("cpu_lbhnc", "cuda_flash")

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}


@dataclass(frozen=True)
class KVLayout:
    """Shape of the engine's KV cache as kvtier moves it: whole blocks, every layer."""

    kind: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str

    def __post_init__(self) -> None:
        if self.kind not in KNOWN_KINDS:
            raise LayoutError(f"unknown KV layout kind {self.kind!r}; kvtier supports {', '.join(KNOWN_KINDS)}")
        if self.dtype not in DTYPE_BYTES:
            raise LayoutError(f"unsupported KV dtype {self.dtype!r}; supported: {', '.join(DTYPE_BYTES)}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            if getattr(self, name) <= 0:
                raise LayoutError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def block_elems_per_layer(self) -> int:
        """Elements of one block of one layer, K and V together."""
        return 2 * self.num_kv_heads * self.block_size * self.head_size

    @property
    def block_bytes_per_layer(self) -> int:
        return self.block_elems_per_layer * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes_per_layer * self.num_layers // self.block_size

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk of ``chunk_tokens`` tokens over all layers."""
        return self.blocks_per_chunk(chunk_tokens) * self.block_bytes_per_layer * self.num_layers

    def blocks_per_chunk(self, chunk_tokens: int) -> int:
        if chunk_tokens <= 0 or chunk_tokens % self.block_size:
            raise LayoutError(
                f"chunk_tokens={chunk_tokens} must be a positive multiple of the engine's block size "
                f"{self.block_size}")
        return chunk_tokens // self.block_size

    def fingerprint(self) -> bytes:
        """16 bytes naming this layout; part of every key and every entry header."""
        text = f"{self.kind}|{self.num_layers}|{self.num_kv_heads}|{self.head_size}|{self.block_size}|{self.dtype}"
        return xxhash.xxh3_128_digest(text.encode())
