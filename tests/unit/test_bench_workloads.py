"""Workload generation of ``kvtier bench``: chat, docqa, rag, lowreuse, arrivals, Zipf."""

from __future__ import annotations

import random
import statistics

import pytest

from kvtier.bench.scenarios import (ChatParams, DocQAParams, LowReuseParams, RagParams, chat_workload,
                                    docqa_workload, lowreuse_workload, rag_workload)
from kvtier.bench.specs import ChatPrompt, TokenPrompt, draw_distinct, poisson_arrivals, zipf_weights
from kvtier.errors import ConfigError

ID_RANGE = (100, 2048)


def count_words(text: str) -> int:
    return len(text.split())


def test_poisson_arrivals_are_seeded_and_have_the_rate() -> None:
    first = poisson_arrivals(2000, 4.0, random.Random(1))
    assert first == poisson_arrivals(2000, 4.0, random.Random(1))
    assert first[0] == 0.0 and first == sorted(first)
    gaps = [b - a for a, b in zip(first, first[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.1)
    assert poisson_arrivals(3, 0.0, random.Random(1)) == [0.0, 0.0, 0.0]


def test_zipf_weights_and_distinct_draws() -> None:
    weights = zipf_weights(10, 1.1)
    assert sum(weights) == pytest.approx(1.0)
    assert weights == sorted(weights, reverse=True)
    assert weights[0] / weights[1] == pytest.approx(2 ** 1.1)
    rng = random.Random(0)
    for _ in range(50):
        drawn = draw_distinct(weights, 3, rng)
        assert len(set(drawn)) == 3
    firsts = [draw_distinct(weights, 1, rng)[0] for _ in range(2000)]
    assert firsts.count(0) > firsts.count(9) * 5  # popular items are drawn far more often


def test_chat_histories_grow_and_users_wait_for_their_answer() -> None:
    params = ChatParams(num_users=3, num_rounds=3, system_tokens=100, context_tokens=200, qps=2.0)
    workload = chat_workload(params, count_words, max_prompt_tokens=4000)
    requests = workload.requests
    assert len(requests) == 9 and workload.has_rounds and workload.num_rounds == 3
    assert [r.round for r in requests] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    system = {r.prompt.messages[0] for r in requests if isinstance(r.prompt, ChatPrompt)}
    assert len(system) == 1  # one system prompt shared by every user
    for request in requests[3:]:
        earlier = requests[request.after]  # the same user's previous turn
        assert request.arrival_s >= 0 and earlier.round == request.round - 1
        assert isinstance(request.prompt, ChatPrompt) and isinstance(earlier.prompt, ChatPrompt)
        assert request.prompt.messages[:len(earlier.prompt.messages)] == earlier.prompt.messages
        assert [role for role, _ in request.prompt.messages[-2:]] == ["assistant", "user"]
    assert all(r.after is None for r in requests[:3])
    users_docs = {r.prompt.messages[1][1] for r in requests[:3] if isinstance(r.prompt, ChatPrompt)}
    assert len(users_docs) == 3  # each user has a document of their own
    assert workload == chat_workload(params, count_words, max_prompt_tokens=4000)  # deterministic


def test_chat_refuses_prompts_that_do_not_fit() -> None:
    with pytest.raises(ConfigError, match="--context-tokens"):
        chat_workload(ChatParams(num_users=1, num_rounds=2, context_tokens=3000), count_words, 2000)


def test_docqa_interleaves_documents() -> None:
    workload = docqa_workload(DocQAParams(num_documents=3, document_tokens=150, questions_per_document=2),
                              count_words, 4000)
    docs = [r.prompt.messages[0][1] for r in workload.requests if isinstance(r.prompt, ChatPrompt)]
    assert len(docs) == 6 and len(set(docs)) == 3
    assert docs[:3] == docs[3:]  # question 1 of every document, then question 2
    assert [r.round for r in workload.requests] == [1, 1, 1, 2, 2, 2]


def test_rag_prompts_hold_k_passages_from_the_pool() -> None:
    params = RagParams(num_requests=30, pool_size=8, passage_tokens=60, passages_per_prompt=3)
    workload = rag_workload(params, count_words, 4000)
    texts = [r.prompt.messages[1][1] for r in workload.requests if isinstance(r.prompt, ChatPrompt)]
    assert all(text.count("Passage ") == 3 for text in texts)
    leading = [text.split("Passage 2:")[0] for text in texts]
    assert len(set(leading)) < len(leading)  # popular passages lead several prompts: shared prefixes


def test_lowreuse_prompts_are_unique_from_the_first_token() -> None:
    workload = lowreuse_workload(LowReuseParams(num_requests=20, prompt_tokens=300), ID_RANGE, 4000)
    prompts = [r.prompt.token_ids for r in workload.requests if isinstance(r.prompt, TokenPrompt)]
    assert len(prompts) == 20 and all(len(p) == 300 for p in prompts)
    assert all(ID_RANGE[0] <= t < ID_RANGE[1] for p in prompts for t in p)
    assert len({p[:16] for p in prompts}) == 20  # no two share even their first 16 tokens
    with pytest.raises(ConfigError, match="--prompt-tokens"):
        lowreuse_workload(LowReuseParams(prompt_tokens=5000), ID_RANGE, 4000)
