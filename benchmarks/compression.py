"""What CacheGen-style compression (remote.compression: cachegen) costs and saves, on a real model.

SmolLM2-135M-Instruct (transformers, CPU) reads real English text (this project's own docs). For
each document the first ``--prefix-tokens`` tokens are prefilled; their KV, rounded to bf16 as
vLLM keeps it, is the reference. The same KV is then compressed and decoded chunk by chunk
(``KVCodec``, 256-token chunks) at each ``--bits`` setting, and the next ``--continuation-tokens``
tokens of the document are scored with the reference KV and with the decoded KV:

- ratio: chunk bytes / compressed bytes (scales and headers included);
- top-1 agreement: how often the most likely next token is the same with both;
- KL: mean KL divergence (nats) of the next-token distribution, reference -> decoded;
- perplexity change of the document's real continuation (percent);
- greedy match: how many of ``--greedy-tokens`` greedily generated tokens are identical;
- encode / decode time per chunk on this machine (medians).

Usage: python benchmarks/compression.py [--bits 3,4,5,6,8] [--prefix-tokens 1024]
(--models-dir: where SmolLM2 is built on first use, default ./models)
Writes benchmarks/results/compression_cpu.json and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvtier.compression import KVCodec
from kvtier.layout import KVLayout
from kvtier.models import SMOLLM2_MODEL, prepare_smollm2

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CHUNK_TOKENS = 256
BLOCK = 16


def documents(tokenizer: object, num_tokens: int) -> list[list[int]]:
    """Token ids of the project's Markdown docs, each at least ``num_tokens`` long."""
    out = []
    for path in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        ids = tokenizer(path.read_text())["input_ids"]  # type: ignore[operator]
        if len(ids) >= num_tokens:
            out.append(ids[:num_tokens])
    return out


def to_bf16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(torch.float32)


def round_trip(codec: KVCodec, keys: list[torch.Tensor], values: list[torch.Tensor],
               timing: dict[str, list[float]]) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
    """Compress and decode the cache chunk by chunk in the ``cuda_flash`` slot layout
    ([layers, 2, blocks, block, heads, dim], bf16); returns the decoded keys and values and the
    raw and compressed byte counts, and appends the seconds per chunk to ``timing``."""
    layers = len(keys)
    heads, tokens, dim = keys[0].shape[1:]
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in zip(keys, values)])  # [L, 2, H, T, D]
    kv = kv.permute(0, 1, 3, 2, 4).to(torch.bfloat16).contiguous()  # [L, 2, T, H, D]
    decoded = torch.empty_like(kv)
    raw = packed = 0
    for start in range(0, tokens, CHUNK_TOKENS):
        chunk = kv[:, :, start:start + CHUNK_TOKENS].contiguous()
        data = chunk.view(torch.uint8).numpy().tobytes()
        started = time.perf_counter()
        encoded = codec.encode(memoryview(data))
        timing["encode_s"].append(time.perf_counter() - started)
        assert encoded is not None
        out = bytearray(len(data))
        started = time.perf_counter()
        codec.decode_into(encoded, memoryview(out))
        timing["decode_s"].append(time.perf_counter() - started)
        words = torch.frombuffer(out, dtype=torch.bfloat16).view(chunk.shape)
        decoded[:, :, start:start + CHUNK_TOKENS] = words
        raw, packed = raw + len(data), packed + len(encoded)
    restored = decoded.to(torch.float32).permute(0, 1, 3, 2, 4)  # [L, 2, H, T, D]
    return ([restored[layer, 0][None] for layer in range(layers)],
            [restored[layer, 1][None] for layer in range(layers)], raw, packed)


def cache_of(keys: list[torch.Tensor], values: list[torch.Tensor]) -> object:
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.clone(), v.clone(), layer)
    return cache


@torch.inference_mode()
def score(model: torch.nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor],
          continuation: list[int], greedy_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Next-token log-probabilities over ``continuation`` given the cached prefix, and the
    greedy generation of ``greedy_tokens`` tokens after the prefix."""
    ids = torch.tensor([continuation])
    logits = model(input_ids=ids, past_key_values=cache_of(keys, values), use_cache=True).logits[0]
    cache = cache_of(keys, values)
    generated: list[int] = []
    token = ids[:, :1]
    for _ in range(greedy_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(int(token))
    return torch.log_softmax(logits.float(), dim=-1), generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="3,4,5,6,8")
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--continuation-tokens", type=int, default=128)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--out", default=str(RESULTS / "compression_cpu.json"))
    args = parser.parse_args()
    if args.prefix_tokens % CHUNK_TOKENS:
        parser.error(f"--prefix-tokens must be a multiple of {CHUNK_TOKENS}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_smollm2(str(Path(args.models_dir) / SMOLLM2_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.config
    layout = KVLayout("cuda_flash", config.num_hidden_layers, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads, BLOCK, "bfloat16")
    docs = documents(tokenizer, args.prefix_tokens + args.continuation_tokens)
    print(f"{len(docs)} documents of {args.prefix_tokens}+{args.continuation_tokens} tokens; layout {layout}",
          flush=True)
    references = []
    with torch.inference_mode():
        for ids in docs:
            out = model(input_ids=torch.tensor([ids[:args.prefix_tokens]]), use_cache=True)
            keys = [to_bf16(layer.keys) for layer in out.past_key_values.layers]
            values = [to_bf16(layer.values) for layer in out.past_key_values.layers]
            continuation = ids[args.prefix_tokens:]
            references.append((keys, values, continuation, *score(model, keys, values, continuation,
                                                                     args.greedy_tokens)))
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        codec = KVCodec(layout, CHUNK_TOKENS, bits)
        timing: dict[str, list[float]] = {"encode_s": [], "decode_s": []}
        agree, kls, ppl_changes, greedy, raw_total, packed_total = [], [], [], [], 0, 0
        for keys, values, continuation, ref_logp, ref_greedy in references:
            dkeys, dvalues, raw, packed = round_trip(codec, keys, values, timing)
            raw_total, packed_total = raw_total + raw, packed_total + packed
            logp, generated = score(model, dkeys, dvalues, continuation, args.greedy_tokens)
            agree.append(float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()))
            kls.append(float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()))
            targets = torch.tensor(continuation[1:])
            nll_ref = -ref_logp[:-1].gather(1, targets[:, None]).mean()
            nll = -logp[:-1].gather(1, targets[:, None]).mean()
            ppl_changes.append(float((torch.exp(nll - nll_ref) - 1) * 100))
            greedy.append(next((i for i, (a, b) in enumerate(zip(generated, ref_greedy)) if a != b), len(generated)))
        row = {"bits": bits, "ratio": raw_total / packed_total, "top1_agreement": statistics.mean(agree),
               "kl_nats": statistics.mean(kls), "perplexity_change_pct": statistics.mean(ppl_changes),
               "greedy_tokens_identical": statistics.mean(greedy),
               "encode_ms_per_chunk": statistics.median(timing["encode_s"]) * 1e3,
               "decode_ms_per_chunk": statistics.median(timing["decode_s"]) * 1e3,
               "chunk_bytes": layout.chunk_bytes(CHUNK_TOKENS)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": SMOLLM2_MODEL, "documents": len(docs), "prefix_tokens": args.prefix_tokens,
              "continuation_tokens": args.continuation_tokens, "greedy_tokens": args.greedy_tokens,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.python_version()}",
              "numpy": np.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# CacheGen-style compression on {SMOLLM2_MODEL}", "",
             f"`python benchmarks/compression.py` ({result['machine']}): {len(docs)} documents (this project's "
             f"docs), {args.prefix_tokens}-token prefix KV in 256-token chunks, scored on the next "
             f"{args.continuation_tokens} tokens against the uncompressed bf16 KV.", "",
             "| bits | size ratio | top-1 agreement | KL (nats) | perplexity change | "
             f"greedy tokens identical (of {args.greedy_tokens}) | encode ms/chunk | decode ms/chunk |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['bits']} | {row['ratio']:.2f}x | {row['top1_agreement'] * 100:.1f}% | "
                     f"{row['kl_nats']:.4f} | {row['perplexity_change_pct']:+.2f}% | "
                     f"{row['greedy_tokens_identical']:.1f} | {row['encode_ms_per_chunk']:.0f} | "
                     f"{row['decode_ms_per_chunk']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
