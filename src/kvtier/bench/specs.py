"""What a benchmark sends: requests fixed in advance, so every configuration gets identical prompts.

A ``Workload`` is a tuple of ``BenchRequest``: when it arrives (seconds after the start of a
repeat), which earlier request must have finished first (a chat user waits for the previous
answer), and its prompt, either chat messages (sent to ``/v1/chat/completions``) or token ids (sent
to ``/v1/completions``, so the engine sees exactly those tokens). Also here: Poisson arrivals,
Zipf weights, deterministic token ids, and what the bench needs to know of a model folder.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvtier.bench.client import Message

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[tuple[str, str], ...]  # (role, content)

    def as_messages(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class TokenPrompt:
    token_ids: tuple[int, ...]


Prompt = ChatPrompt | TokenPrompt


@dataclass(frozen=True)
class BenchRequest:
    index: int  # position in the workload, 0-based
    arrival_s: float  # seconds after the repeat starts; sent then, or when ``after`` finished if later
    after: int | None  # index of a request that must finish first (same chat user), None if none
    round: int  # chat round / question number (1-based); 1 where the workload has no rounds
    prompt: Prompt
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[BenchRequest, ...]
    parameters: tuple[tuple[str, float | int | str], ...]  # for the report, in the user's words
    has_rounds: bool  # True when ``round`` means something (TTFT per round is plotted)

    @property
    def num_rounds(self) -> int:
        return max((request.round for request in self.requests), default=0)


@dataclass(frozen=True)
class ModelInfo:
    """What the bench needs of a model folder: KV bytes per token and a range of ordinary token ids."""

    path: str  # the local folder with config.json and tokenizer.json
    kv_bytes_per_token: int  # K and V, all layers, bf16
    vocab_size: int
    engine_model: str = ""  # what the servers get as --model ("" = ``path``; a Hugging Face id)

    @property
    def served_name(self) -> str:
        """vLLM's --model of every server, which requests name too."""
        return self.engine_model or self.path

    @property
    def token_id_range(self) -> tuple[int, int]:
        """[low, high) ids for generated prompts; low ids (special tokens, bytes) are avoided."""
        return self.vocab_size // 16, self.vocab_size


def read_model_info(model_dir: str, engine_model: str = "") -> ModelInfo:
    """Read ``config.json`` of a Hugging Face model folder (``engine_model``: the servers' --model
    when it is not the folder). Raises OSError or KeyError if it is not one."""
    with open(os.path.join(model_dir, "config.json")) as file:
        config = json.load(file)
    num_kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return ModelInfo(path=model_dir, kv_bytes_per_token=config["num_hidden_layers"] * num_kv_heads * head_dim * 2 * 2,
                     vocab_size=int(config["vocab_size"]), engine_model=engine_model)


def token_counter(model_dir: str) -> CountTokens:
    """Counts tokens of a text with the folder's ``tokenizer.json`` (no special tokens added)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def poisson_arrivals(num_requests: int, qps: float, rng: random.Random) -> list[float]:
    """Arrival times (s) of a Poisson process at ``qps`` requests per second, the first at 0;
    ``qps`` 0 means all at once (the concurrency limit then paces them)."""
    if qps <= 0:
        return [0.0] * num_requests
    times, now_s = [], 0.0
    for index in range(num_requests):
        if index:
            now_s += rng.expovariate(qps)
        times.append(now_s)
    return times


def zipf_weights(num_items: int, exponent: float) -> list[float]:
    """Popularity of item i proportional to 1 / (i + 1) ** exponent, normalised to sum to 1."""
    raw = [1.0 / math.pow(rank + 1, exponent) for rank in range(num_items)]
    total = sum(raw)
    return [weight / total for weight in raw]


def draw_distinct(weights: list[float], count: int, rng: random.Random) -> list[int]:
    """``count`` distinct indices drawn by weight without replacement, in the order drawn."""
    chosen: list[int] = []
    remaining = list(range(len(weights)))
    for _ in range(min(count, len(weights))):
        pick = rng.choices(remaining, weights=[weights[i] for i in remaining])[0]
        chosen.append(pick)
        remaining.remove(pick)
    return chosen


def random_token_ids(seed: int, num_tokens: int, id_range: tuple[int, int]) -> tuple[int, ...]:
    """``num_tokens`` ids in ``id_range``, a pure function of ``seed`` (same on every machine)."""
    rng = random.Random(seed)
    low, high = id_range
    return tuple(rng.randrange(low, high) for _ in range(num_tokens))


def parameter_items(values: Mapping[str, float | int | str]) -> tuple[tuple[str, float | int | str], ...]:
    return tuple(values.items())
