"""A frozen description of the engine's paged KV memory, and the byte math that follows from it.

No torch here: the worker-side data path (``kvtier.datapath``) checks real tensors against a
``KVLayout``; everything above it only needs the numbers.

Kinds we know. In every one, the engine keeps one tensor per layer of logical shape [num_blocks,
num_kv_heads, block_size, 2*head_size], and a block of one layer is one contiguous page of
``num_kv_heads * block_size * 2 * head_size`` elements (pages of one layer need not be adjacent);
the kinds differ in what the page holds:
- ``cpu_lbhnc``: vLLM-CPU's attention (``CPU_ATTN``). A page is [heads][K transposed, then V].
- ``packed_nhd``: CUDA FlashAttention, FlashInfer and Triton attention with vLLM's default NHD cache
  layout (stride order (0, 2, 1, 3)): a page is [block_size][heads][K | V], K and V packed in the
  last dimension.
- ``packed_hnd``: the same backends with the HND cache layout (stride order (0, 1, 2, 3)): a page is
  [heads][block_size][K | V].
- ``mla``: multi-head latent attention (DeepSeek-V2/V3; vLLM-CPU's ``CPU_MLA``/``AMX_MLA`` and the
  CUDA MLA backends). One tensor per layer of shape [num_blocks, (1,) block_size, head_size]: a page is
  [block_size][latent], one latent vector per token (``kv_lora_rank`` + rope dims, e.g. 576) shared
  by every head, no separate K and V. ``num_kv_heads`` is 1 and ``head_size`` the latent's width.
  Under tensor parallelism every rank holds the same latents (``replicated_across_ranks``), so a
  chunk is stored once (one shard), not once per rank.
``derive_kind`` names the kind from what the engine registers (backend, shape, strides) and refuses
anything else with a ``LayoutError`` naming the backend, shape and strides: never guessed, never
silent zero hits. Entries of different kinds never meet: the kind is in every key's fingerprint.

Slot formats (``kv_format``, config key ``memory.kv_format``): how a chunk is held in a host slot,
and so on disk and in the remote tier.
- ``exact``: the engine's pages as they are, [layers, blocks, page] in the engine's dtype.
- ``int8``: the pages quantised (``kvtier.slotcodec``): int8 [layers, blocks, page], then one float32
  scale per ``INT8_GROUP_ELEMS`` contiguous elements of a page, [layers, blocks, page / group].
  About half the bytes of bf16/fp16 (a quarter of fp32); lossy. Only for bf16, fp16 and fp32 KV.
The format is in the fingerprint (when not ``exact``), so entries of different formats never meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from kvtier.errors import LayoutError

KNOWN_KINDS = ("cpu_lbhnc", "packed_nhd", "packed_hnd", "mla")

# Attention backends (vLLM's names) whose KV pages kvtier knows, and the kinds each can produce.
PACKED_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")
MLA_BACKENDS = ("CPU_MLA", "AMX_MLA", "FLASHMLA", "FLASHINFER_MLA", "TRITON_MLA", "CUTLASS_MLA", "FLASH_ATTN_MLA")
BACKEND_KINDS = {"CPU_ATTN": ("cpu_lbhnc",), **{name: ("packed_nhd", "packed_hnd") for name in PACKED_BACKENDS},
                 **{name: ("mla",) for name in MLA_BACKENDS}}
# Physical order of the logical dims, outermost first: (blocks, heads, block_size, 2*head_size),
# or for MLA (blocks, block_size, head_size).
_KIND_ORDER = {"cpu_lbhnc": (0, 1, 2, 3), "packed_nhd": (0, 2, 1, 3), "packed_hnd": (0, 1, 2, 3), "mla": (0, 1, 2)}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}

KV_FORMATS = ("exact", "int8")
INT8_DTYPES = ("bfloat16", "float16", "float32")  # KV dtypes the int8 slot format can quantise
INT8_GROUP_ELEMS = 64  # elements of a page that share one scale in the int8 slot format
INT8_SCALE_BYTES = 4  # float32 scales


@dataclass(frozen=True)
class KVLayout:
    """Shape of the engine's KV cache as kvtier moves it: whole blocks, every layer."""

    kind: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str
    kv_format: str = "exact"  # how a slot holds a chunk: "exact" | "int8" (module docstring)
    # several KV cache groups (``kvtier.kvgroups``): their kinds and layers, in slot order ("" one group)
    groups: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KNOWN_KINDS:
            raise LayoutError(f"unknown KV layout kind {self.kind!r}; kvtier supports {', '.join(KNOWN_KINDS)}")
        if self.dtype not in DTYPE_BYTES:
            raise LayoutError(f"unsupported KV dtype {self.dtype!r}; supported: {', '.join(DTYPE_BYTES)}")
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            if getattr(self, name) <= 0:
                raise LayoutError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kind == "mla" and self.num_kv_heads != 1:
            raise LayoutError(f"an MLA layout has one latent head, got num_kv_heads={self.num_kv_heads}")
        if self.kv_format not in KV_FORMATS:
            raise LayoutError(f"unknown KV slot format {self.kv_format!r}; kvtier supports {', '.join(KV_FORMATS)}")
        if self.kv_format == "int8" and self.dtype not in INT8_DTYPES:
            raise LayoutError(f"memory.kv_format int8 quantises {', '.join(INT8_DTYPES)} KV, the engine's is "
                              f"{self.dtype}; set memory.kv_format: exact")
        if self.kv_format == "int8" and self.block_elems_per_layer % INT8_GROUP_ELEMS:
            raise LayoutError(f"memory.kv_format int8 needs pages of a multiple of {INT8_GROUP_ELEMS} elements, "
                              f"this engine's are {self.block_elems_per_layer}; set memory.kv_format: exact")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def replicated_across_ranks(self) -> bool:
        """Whether every tensor-parallel rank holds the same KV (MLA's latents): then a chunk has
        one shard in the disk and remote tiers, written by rank 0 and read by every rank."""
        return self.kind == "mla"

    @property
    def num_planes(self) -> int:
        """Vectors per token and head: K and V (2), or MLA's one latent (1)."""
        return 1 if self.kind == "mla" else 2

    @property
    def block_elems_per_layer(self) -> int:
        """Elements of one block of one layer, K and V together."""
        return self.num_planes * self.num_kv_heads * self.block_size * self.head_size

    @property
    def block_bytes_per_layer(self) -> int:
        return self.block_elems_per_layer * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        """The engine's KV bytes per token (exact format, whatever ``kv_format``)."""
        return self.block_bytes_per_layer * self.num_layers // self.block_size

    @property
    def slot_page_bytes(self) -> int:
        """Bytes of one block of one layer in a slot, in ``kv_format``."""
        if self.kv_format == "int8":
            return self.block_elems_per_layer + self.block_elems_per_layer // INT8_GROUP_ELEMS * INT8_SCALE_BYTES
        return self.block_bytes_per_layer

    def raw_chunk_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk in the engine's own dtype (what a chunk is on the device)."""
        return self.blocks_per_chunk(chunk_tokens) * self.block_bytes_per_layer * self.num_layers

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk of ``chunk_tokens`` tokens over all layers, as a slot holds it
        (``kv_format``): the size of a host slot, of a disk entry's payload, of a remote value."""
        return self.blocks_per_chunk(chunk_tokens) * self.slot_page_bytes * self.num_layers

    def blocks_per_chunk(self, chunk_tokens: int) -> int:
        if chunk_tokens <= 0 or chunk_tokens % self.block_size:
            raise LayoutError(
                f"chunk_tokens={chunk_tokens} must be a positive multiple of the engine's block size "
                f"{self.block_size}")
        return chunk_tokens // self.block_size

    def fingerprint(self) -> bytes:
        """16 bytes naming this layout; part of every key and every entry header."""
        text = f"{self.kind}|{self.num_layers}|{self.num_kv_heads}|{self.head_size}|{self.block_size}|{self.dtype}"
        if self.kv_format != "exact":  # exact keeps the fingerprint it had before formats existed
            text += f"|{self.kv_format}:{INT8_GROUP_ELEMS}:f32"
        if self.groups:  # a slot of several groups is laid out group after group, windows only partly kept
            text += f"|groups:{self.groups}"
        return xxhash.xxh3_128_digest(text.encode())


def derive_kind(backend: str, shape: tuple[int, ...], strides: tuple[int, ...], num_kv_heads: int,
                block_size: int, head_size: int) -> str:
    """The layout kind of one layer's KV tensor as the engine registered it, from the attention
    backend's name (vLLM's, e.g. ``FLASH_ATTN``) and the tensor's shape and strides (in elements).

    Raises ``LayoutError`` naming the backend, shape and strides when kvtier does not know it.
    """
    described = f"attention backend {backend!r} with a KV tensor of shape {tuple(shape)} and strides {tuple(strides)}"
    kinds = BACKEND_KINDS.get(backend)
    if kinds is None:
        raise LayoutError(f"kvtier does not know the KV layout of {described}; it supports the backends "
                          f"{', '.join(BACKEND_KINDS)}")
    if kinds == ("mla",):
        if len(shape) == 4 and shape[1] == 1:  # vLLM-CPU's AMX_MLA keeps a heads dim of 1
            shape, strides = (shape[0], *shape[2:]), (strides[0], *strides[2:])
        if len(shape) != 3 or tuple(shape[1:]) != (block_size, head_size):
            raise LayoutError(f"kvtier does not know the KV layout of {described}: expected [num_blocks, "
                              f"{block_size}, {head_size}] (blocks, block size, latent)")
    elif len(shape) != 4 or tuple(shape[1:]) != (num_kv_heads, block_size, 2 * head_size):
        raise LayoutError(f"kvtier does not know the KV layout of {described}: expected [num_blocks, "
                          f"{num_kv_heads}, {block_size}, {2 * head_size}] (blocks, heads, block size, K|V)")
    for kind in kinds:
        if _pages_in_order(shape, strides, _KIND_ORDER[kind]):
            return kind
    raise LayoutError(f"kvtier does not know the KV layout of {described}: its blocks are not laid out "
                      f"in a physical order kvtier knows for this backend ({', '.join(kinds)})")


def _pages_in_order(shape: tuple[int, ...], strides: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """Whether each block is one dense page whose dims lie in ``order`` (outermost first, the block
    dim first), and pages do not overlap. Blocks need not be adjacent: when the engine keeps all
    layers in one buffer with the layer inside the block (vLLM's BL* cache layouts), a layer's
    pages are ``num_layers`` pages apart."""
    expected = 1
    for dim in reversed(order[1:]):
        if shape[dim] > 1 and strides[dim] != expected:
            return False
        expected *= shape[dim]
    return shape[order[0]] == 1 or strides[order[0]] >= expected
