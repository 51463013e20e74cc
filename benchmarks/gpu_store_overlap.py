"""Do kvtier's stores stay off the critical path on a GPU? (issue 7)

The vLLM worker queues a step's stores (``ChunkMover.gather_chunks``) and returns; the copies run
on their own streams while the next forward runs. This measures, in one run, on a paged KV cache of
Llama-3.1-8B shape (packed HND layout, 32 layers, 8 KV heads, head_dim 128, bf16, block 16):
- ``forward_alone_s``: a stand-in forward (bf16 matmuls of an 8B MLP's size) on the engine's stream;
- ``store_alone_s``: storing N tokens (queue + wait);
- ``queue_s``: CPU time for ``gather_chunks`` to return (what the engine step actually waits for);
- ``forward_with_store_s``: the same forward launched right after queueing the store, timed on the
  engine's stream; ``added_s`` = forward_with_store - forward_alone is the store's cost to the step,
  against ``store_alone_s`` if it were synchronous.
Bit-exactness of the stored chunks is checked. Writes gpu_store_overlap_<date>_<gpu>.json.
Usage: python benchmarks/gpu_store_overlap.py [--out-dir DIR] [--tokens 8192 32768] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from kvtier.datapath import ChunkMover, HostPool, PagedKV  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.plans import StoreOp  # noqa: E402

CHUNK_TOKENS = 256


def build(tokens: int, device: torch.device, smoke: bool):  # type: ignore[no-untyped-def]
    layers, heads, head_dim, block = (2, 2, 16, 16) if smoke else (32, 8, 128, 16)
    layout = KVLayout("packed_hnd", layers, heads, head_dim, block, "bfloat16")
    num_blocks = tokens // block * 2
    gen = torch.Generator(device=device).manual_seed(0)
    kv = [torch.randn((num_blocks, heads, block, 2 * head_dim), generator=gen, device=device).to(torch.bfloat16)
          for _ in range(layers)]
    paged = PagedKV(kv, layout, "FLASH_ATTN")
    num_chunks = tokens // CHUNK_TOKENS
    pool = HostPool(num_chunks, layout.chunk_bytes(CHUNK_TOKENS), pin_memory=device.type == "cuda")
    per_chunk = CHUNK_TOKENS // block
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))[: num_chunks * per_chunk].tolist()
    ops = [StoreOp(b"", i, tuple(order[i * per_chunk:(i + 1) * per_chunk])) for i in range(num_chunks)]
    return kv, paged, pool, ChunkMover(paged, pool, per_chunk), ops


def make_forward(device: torch.device, smoke: bool):  # type: ignore[no-untyped-def]
    n, d, f = (256, 256, 512) if smoke else (4096, 4096, 14336)
    x = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    w1 = torch.randn(d, f, device=device, dtype=torch.bfloat16) / d ** 0.5
    w2 = torch.randn(f, d, device=device, dtype=torch.bfloat16) / f ** 0.5

    def forward() -> None:
        h = x
        for _ in range(24):
            h = (h @ w1).relu_() @ w2
    return forward


def event_time(fn, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def measure(tokens: int, device: torch.device, repeats: int, smoke: bool) -> dict:
    kv, paged, pool, mover, ops = build(tokens, device, smoke)
    forward = make_forward(device, smoke)
    for _ in range(2):
        forward()
        mover.gather_chunks(ops)
        mover.wait()
    alone, store, queue, with_store = [], [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize() if device.type == "cuda" else None
        alone.append(event_time(forward, device))

        def store_sync() -> None:
            mover.gather_chunks(ops)
            mover.wait()
        started = time.perf_counter()
        store_sync()
        store.append(time.perf_counter() - started)

        torch.cuda.synchronize() if device.type == "cuda" else None
        started = time.perf_counter()
        mover.gather_chunks(ops)
        queue.append(time.perf_counter() - started)
        with_store.append(event_time(forward, device))
        mover.wait()
    # bit check: every stored chunk equals its engine blocks
    exact = all(torch.equal(paged.slot_view(pool.slot(op.slot).to(device), len(op.block_ids))[layer]
                            .view(torch.int16),
                            kv[layer].view(torch.int16)[:, list(op.block_ids)].reshape(2, len(op.block_ids), -1))
                for op in ops[:4] for layer in range(len(kv)))
    med = statistics.median
    return {"tokens": tokens, "bytes": len(ops) * pool.slot_bytes, "forward_alone_s": med(alone),
            "store_alone_s": med(store), "queue_s": med(queue), "forward_with_store_s": med(with_store),
            "added_s": med(with_store) - med(alone), "bit_exact": exact,
            "store_gbps": len(ops) * pool.slot_bytes / med(store) / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("no GPU: run with --smoke")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = [measure(tokens, device, args.repeats, args.smoke) for tokens in args.tokens]
    report = {"gpu": gpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "rows": rows}
    for row in rows:
        print(f"{row['tokens']:>6} tokens: store alone {row['store_alone_s'] * 1e3:7.1f} ms "
              f"({row['store_gbps']:.1f} GB/s), queue {row['queue_s'] * 1e3:6.1f} ms, forward "
              f"{row['forward_alone_s'] * 1e3:7.1f} ms alone / {row['forward_with_store_s'] * 1e3:7.1f} ms "
              f"with the store in flight (+{row['added_s'] * 1e3:.1f} ms), bit-exact {row['bit_exact']}")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = Path(args.out_dir) / f"gpu_store_overlap_{report['date']}_{slug}.json"
    if not args.smoke:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if all(row["bit_exact"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
