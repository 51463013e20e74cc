"""Fingerprints of what changes the KV besides the tokens, bound into every key: the model (its
weights, config, dtype, KV cache dtype, quantization, revision) and a request's LoRA adapter.

Pure file hashing (no torch, no vLLM). A local folder is fingerprinted by its config files (whole)
and its weight files (name, size and ``SAMPLES_PER_FILE`` slices of ``SAMPLE_BYTES`` spread over
each file): a checkpoint swapped in at the same path, a fine-tune of the same shape, or another
adapter at the same path gets another fingerprint, at the cost of reading about 1 MiB per file.
A name that is not a local folder (a hub id) is fingerprinted by its name and revision only.
"""

from __future__ import annotations

import functools
import os

import xxhash

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 << 10
CONFIG_FILES = ("config.json", "adapter_config.json", "params.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")


def folder_fingerprint(path: str) -> str:
    """Hex fingerprint of the model or adapter files in folder ``path``; "" when ``path`` is not a
    local folder."""
    if not os.path.isdir(path):
        return ""
    digest = xxhash.xxh3_128()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name in CONFIG_FILES:
            with open(full, "rb") as f:
                digest.update(f"{name}\0".encode() + f.read())
        elif name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{name}\0{os.path.getsize(full)}\0".encode())
            digest.update(_samples(full))
    return digest.hexdigest()


@functools.lru_cache(maxsize=1024)
def adapter_fingerprint(path: str, lora_id: int) -> str:
    """``folder_fingerprint`` of a LoRA adapter, read once per path and ``lora_id`` in a process:
    vLLM requires a new ``lora_int_id`` for changed adapter weights, so new files at the same path
    come with a new id and are read again."""
    return folder_fingerprint(path)


def model_fingerprint(model: str, revision: str | None, dtype: str, kv_cache_dtype: str,
                      quantization: str | None) -> str:
    """16 hex digits naming the model's KV: its files (when ``model`` is a local folder), revision,
    dtype, KV cache dtype and quantization."""
    text = f"{revision}|{dtype}|{kv_cache_dtype}|{quantization}|{folder_fingerprint(model)}"
    return xxhash.xxh3_64_hexdigest(text.encode())


def _samples(path: str) -> bytes:
    size = os.path.getsize(path)
    if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
        with open(path, "rb") as f:
            return f.read()
    step = (size - SAMPLE_BYTES) // (SAMPLES_PER_FILE - 1)
    parts = []
    with open(path, "rb") as f:
        for index in range(SAMPLES_PER_FILE):
            f.seek(index * step)
            parts.append(f.read(SAMPLE_BYTES))
    return b"".join(parts)
