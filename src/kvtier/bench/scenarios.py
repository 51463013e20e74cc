"""The synthetic workloads of ``kvtier bench``: chat, docqa, rag, lowreuse (trace replay is in ``trace``).

Every workload is fixed before the first request is sent (``specs.Workload``): the assistant turns
of a chat history are generated sentences, not the model's answers, so every configuration sees
exactly the same prompts. Texts are gazetteers of invented towns (``workload``), sized with the
model's tokenizer; lowreuse sends random token ids. Arrivals are Poisson at ``qps`` (seeded).

Each builder raises ConfigError (naming the flag) when its prompts would not fit the context.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from kvtier.bench.specs import (BenchRequest, ChatPrompt, CountTokens, TokenPrompt, Workload, draw_distinct,
                                parameter_items, poisson_arrivals, random_token_ids, zipf_weights)
from kvtier.bench.workload import INSTRUCTIONS, Document, describe_town, make_document, make_question
from kvtier.errors import ConfigError

_MESSAGE_OVERHEAD_TOKENS = 8  # role markers of the chat template, per message, generously
_RAG_INSTRUCTIONS = "Answer the question using only the passages given. Answer in one sentence."


@dataclass(frozen=True)
class ChatParams:
    num_users: int = 4
    num_rounds: int = 3
    system_tokens: int = 500  # the system prompt every user shares
    context_tokens: int = 1000  # each user's own document, sent in the first turn
    max_tokens: int = 32
    qps: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class DocQAParams:
    num_documents: int = 4
    document_tokens: int = 1500
    questions_per_document: int = 3
    max_tokens: int = 32
    qps: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class RagParams:
    num_requests: int = 24
    pool_size: int = 20
    passage_tokens: int = 300
    passages_per_prompt: int = 3
    zipf_exponent: float = 1.1
    max_tokens: int = 32
    qps: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class LowReuseParams:
    num_requests: int = 24
    prompt_tokens: int = 512
    max_tokens: int = 32
    qps: float = 1.0
    seed: int = 0


def chat_workload(params: ChatParams, count_tokens: CountTokens, max_prompt_tokens: int) -> Workload:
    """U users, R rounds: a shared system prompt, then each user's document and a question; every
    later round appends an assistant answer and a new question (the history grows). Turns arrive
    round-robin (round 1 of every user, then round 2, ...) at Poisson times; a user's turn is sent no
    earlier than the answer to that user's previous turn."""
    rng = random.Random(params.seed)
    system = INSTRUCTIONS + make_document(params.seed * 7919 + 1, params.system_tokens, count_tokens).text
    documents = [make_document(params.seed * 1000 + user, params.context_tokens, count_tokens)
                 for user in range(params.num_users)]
    histories: list[list[tuple[str, str]]] = [[("system", system)] for _ in documents]
    arrivals = poisson_arrivals(params.num_users * params.num_rounds, params.qps, rng)
    requests: list[BenchRequest] = []
    last_of_user: dict[int, int] = {}
    for round_index in range(1, params.num_rounds + 1):
        for user, document in enumerate(documents):
            history = histories[user]
            town = rng.choice(document.towns)
            question = make_question(town, rng)
            if round_index == 1:
                question = f"Here are my notes.\n\n{document.text}\n\n{question}"
            history.append(("user", question))
            index = len(requests)
            requests.append(BenchRequest(index, arrivals[index], last_of_user.get(user), round_index,
                                         ChatPrompt(tuple(history)), params.max_tokens))
            last_of_user[user] = index
            history.append(("assistant", describe_town(town, rng).split(". ")[0] + "."))
    _check_fits([r.prompt for r in requests[-params.num_users:]], count_tokens, max_prompt_tokens,
                "--system-tokens, --context-tokens or --rounds")
    return Workload("chat", tuple(requests), parameter_items(asdict(params)), has_rounds=True)


def docqa_workload(params: DocQAParams, count_tokens: CountTokens, max_prompt_tokens: int) -> Workload:
    """D long documents, Q questions each, interleaved: question 1 of every document, then question 2,
    ... Each prompt is the document (system message) and one question."""
    rng = random.Random(params.seed)
    documents = [make_document(params.seed * 1000 + 100 + i, params.document_tokens, count_tokens)
                 for i in range(params.num_documents)]
    num_requests = params.num_documents * params.questions_per_document
    arrivals = poisson_arrivals(num_requests, params.qps, rng)
    requests = []
    for question_index in range(1, params.questions_per_document + 1):
        for document in documents:
            question = make_question(rng.choice(document.towns), rng)
            prompt = ChatPrompt((("system", INSTRUCTIONS + document.text), ("user", question)))
            index = len(requests)
            requests.append(BenchRequest(index, arrivals[index], None, question_index, prompt, params.max_tokens))
    _check_fits([r.prompt for r in requests[:params.num_documents]], count_tokens, max_prompt_tokens,
                "--document-tokens")
    return Workload("docqa", tuple(requests), parameter_items(asdict(params)), has_rounds=True)


def rag_workload(params: RagParams, count_tokens: CountTokens, max_prompt_tokens: int) -> Workload:
    """Each prompt: k passages drawn without replacement from a pool whose popularity is Zipf
    (exponent s), in the order drawn, then a question about the first passage. Only a shared leading
    run of passages is a shared prefix, as in real retrieval-augmented prompts."""
    rng = random.Random(params.seed)
    pool = [make_document(params.seed * 1000 + 300 + i, params.passage_tokens, count_tokens)
            for i in range(params.pool_size)]
    weights = zipf_weights(params.pool_size, params.zipf_exponent)
    arrivals = poisson_arrivals(params.num_requests, params.qps, rng)
    requests = []
    for index in range(params.num_requests):
        chosen = [pool[i] for i in draw_distinct(weights, params.passages_per_prompt, rng)]
        prompt = ChatPrompt((("system", _RAG_INSTRUCTIONS), ("user", _rag_question(chosen, rng))))
        requests.append(BenchRequest(index, arrivals[index], None, 1, prompt, params.max_tokens))
    _check_fits([r.prompt for r in requests], count_tokens, max_prompt_tokens,
                "--passage-tokens or --passages-per-prompt")
    return Workload("rag", tuple(requests), parameter_items(asdict(params)), has_rounds=False)


def _rag_question(passages: list[Document], rng: random.Random) -> str:
    context = "\n\n".join(f"Passage {n}: {doc.text}" for n, doc in enumerate(passages, start=1))
    return f"{context}\n\nQuestion: {make_question(rng.choice(passages[0].towns), rng)}"


def lowreuse_workload(params: LowReuseParams, id_range: tuple[int, int], max_prompt_tokens: int) -> Workload:
    """N short prompts of random token ids, unique from their first token: nothing can be reused,
    so any difference to plain vLLM is kvtier's overhead."""
    if params.prompt_tokens > max_prompt_tokens:
        raise ConfigError("--prompt-tokens", f"{params.prompt_tokens} tokens exceed the {max_prompt_tokens} "
                                             "a prompt may have here")
    rng = random.Random(params.seed)
    arrivals = poisson_arrivals(params.num_requests, params.qps, rng)
    requests = tuple(
        BenchRequest(index, arrivals[index], None, 1,
                     TokenPrompt(random_token_ids(params.seed * 1_000_003 + index, params.prompt_tokens, id_range)),
                     params.max_tokens)
        for index in range(params.num_requests))
    return Workload("lowreuse", requests, parameter_items(asdict(params)), has_rounds=False)


def chat_prompt_tokens(prompt: ChatPrompt, count_tokens: CountTokens) -> int:
    """An upper estimate of a chat prompt's tokens: contents plus the template's markers."""
    return sum(count_tokens(content) + _MESSAGE_OVERHEAD_TOKENS for _, content in prompt.messages)


def _check_fits(prompts: list[ChatPrompt | TokenPrompt], count_tokens: CountTokens, max_prompt_tokens: int,
                flags: str) -> None:
    for prompt in prompts:
        size = chat_prompt_tokens(prompt, count_tokens) if isinstance(prompt, ChatPrompt) else len(prompt.token_ids)
        if size > max_prompt_tokens:
            raise ConfigError(flags, f"a prompt of about {size:,} tokens would not fit: at most "
                                     f"{max_prompt_tokens:,} prompt tokens here (max model length minus "
                                     "--max-tokens); make it smaller")
