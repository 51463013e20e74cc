"""Write tests/data/mooncake_sample.jsonl: a tiny trace in the Mooncake format (20 requests).

Run from the repository root: ``python tests/data/make_mooncake_sample.py``. The output is a pure
function of the seed; ``kvtier bench trace tests/data/mooncake_sample.jsonl --block-tokens 128``
replays it within a 4,096-token context.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvtier.bench.trace import make_sample_trace

OUT = Path(__file__).with_name("mooncake_sample.jsonl")

if __name__ == "__main__":
    lines = make_sample_trace(num_requests=20, seed=0)
    OUT.write_text("".join(json.dumps(line, separators=(", ", ": ")) + "\n" for line in lines))
    print(f"wrote {OUT} ({len(lines)} requests)")
