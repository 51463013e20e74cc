"""Multi-user chat workloads over long, generated documents; deterministic, no downloads.

A document is a gazetteer of invented towns, in plain English, with facts a question can ask about
(founding year, trade, river, landmark, mayor). Each user chats about a document given as the system
prompt: every round appends a question, then the answer the server gave, to that user's history.
Users take turns round-robin, so with a small engine cache a user's context is evicted before that
user's next turn.

By default every user has a document of their own. With ``shared_document`` all users get the same
one: the engine's own prefix cache then keeps it (it is touched by every request), which shows the
opposite case, where an external tier has little to add.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.bench.client import Message

CountTokens = Callable[[str], int]

INSTRUCTIONS = ("You are a helpful assistant. Answer questions about the gazetteer below in one short "
                "sentence, using only the facts it gives.\n\n")
_SYLLABLES = ("vel", "mor", "ka", "dan", "ris", "tol", "ven", "sar", "lin", "bro", "ath", "el", "um", "or",
              "quen", "tha", "ro", "wyn", "bel", "gar", "ist", "ock", "ma", "fen")
_FIRST_NAMES = ("Ada", "Bram", "Cora", "Dmitri", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
                "Lionel", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Soren", "Tova", "Yusuf")
_TRADES = ("salt mining", "wool weaving", "glassmaking", "apple orchards", "shipbuilding", "clockmaking",
           "printing", "river fishing", "copper smelting", "cheese making", "paper milling", "bell founding",
           "rope making", "honey and beeswax", "stone carving", "barrel making")
_LANDMARKS = ("a stone bridge with seven arches", "a white lighthouse", "a covered market hall",
              "an old observatory", "a clock tower", "a ruined abbey", "a public library built of red brick",
              "a long wooden pier", "a hilltop windmill", "a round theatre", "a botanical garden",
              "a granite fountain")
_WEATHER = ("mild and wet", "dry and windy", "cold in winter and short in summer", "foggy in the mornings",
            "warm and sunny", "rainy in spring")
_SEASONS = ("spring", "summer", "autumn", "winter")


@dataclass(frozen=True)
class Town:
    name: str
    founded_year: int
    population: int
    trade: str
    river: str
    landmark: str
    mayor: str
    weather: str
    festival_season: str


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    towns: tuple[Town, ...]
    num_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    num_users: int
    num_rounds: int
    document_tokens: int  # tokens of each document, as the model's tokenizer counts them
    seed: int = 0
    shared_document: bool = False


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_town(rng: random.Random) -> Town:
    return Town(name=_name(rng), founded_year=rng.randint(1100, 1890), population=rng.randrange(800, 90_000, 10),
                trade=rng.choice(_TRADES), river=_name(rng), landmark=rng.choice(_LANDMARKS),
                mayor=f"{rng.choice(_FIRST_NAMES)} {_name(rng)}", weather=rng.choice(_WEATHER),
                festival_season=rng.choice(_SEASONS))


def describe_town(town: Town, rng: random.Random) -> str:
    """One paragraph (about 120 tokens) stating every fact of the town in varied words."""
    sentences = [
        rng.choice((f"{town.name} was founded in {town.founded_year} on the banks of the river {town.river}.",
                    f"Founded in {town.founded_year}, {town.name} grew up where the river {town.river} "
                    "bends to the east.")),
        rng.choice((f"About {town.population:,} people live there today.",
                    f"Its population was {town.population:,} at the last count.")),
        rng.choice((f"The town is best known for {town.trade}, which employs most of its families.",
                    f"For generations its main trade has been {town.trade}.")),
        rng.choice((f"Visitors come to see {town.landmark} near the old square.",
                    f"The most famous sight is {town.landmark}, drawn on every postcard.")),
        f"The current mayor is {town.mayor}, who was elected for a term of {rng.randint(3, 6)} years.",
        rng.choice((f"The weather is {town.weather}.", f"Travellers say the climate is {town.weather}.")),
        f"Every {town.festival_season} the town holds a festival with music, markets and a boat race.",
    ]
    return " ".join(sentences)


def make_document(seed: int, num_tokens: int, count_tokens: CountTokens) -> Document:
    """A gazetteer of at least ``num_tokens`` tokens (whole paragraphs, so a little more)."""
    rng = random.Random(seed)
    title = f"A gazetteer of the {_name(rng)} valley, volume {seed % 97 + 1}"
    paragraphs = [title]
    towns: list[Town] = []
    while True:
        text = "\n\n".join(paragraphs)
        size = count_tokens(text)
        if size >= num_tokens:
            return Document(title, text, tuple(towns), size)
        town = make_town(rng)
        towns.append(town)
        paragraphs.append(describe_town(town, rng))


def make_question(town: Town, rng: random.Random) -> str:
    return rng.choice((f"When was {town.name} founded?", f"What is {town.name} best known for?",
                       f"Which river runs through {town.name}?", f"Who is the mayor of {town.name}?",
                       f"What can visitors see in {town.name}?", f"How many people live in {town.name}?",
                       f"In which season does {town.name} hold its festival?"))


class Conversation:
    """One user's chat: a fixed system prompt, then alternating questions and the server's answers."""

    def __init__(self, user: int, document: Document, seed: int) -> None:
        self.user = user
        self.document = document
        self.history: list[Message] = [{"role": "system", "content": INSTRUCTIONS + document.text}]
        self._rng = random.Random(seed)

    def ask(self) -> list[Message]:
        """Append the next question and return the whole message list to send."""
        question = make_question(self._rng.choice(self.document.towns), self._rng)
        self.history.append({"role": "user", "content": question})
        return list(self.history)

    def answer(self, text: str) -> None:
        self.history.append({"role": "assistant", "content": text})

    @property
    def last_question(self) -> str:
        return next(m["content"] for m in reversed(self.history) if m["role"] == "user")


def make_conversations(spec: WorkloadSpec, count_tokens: CountTokens) -> list[Conversation]:
    shared = make_document(spec.seed * 1000, spec.document_tokens, count_tokens)
    conversations = []
    for user in range(spec.num_users):
        document = shared if spec.shared_document else make_document(
            spec.seed * 1000 + user, spec.document_tokens, count_tokens)
        conversations.append(Conversation(user, document, seed=spec.seed * 1000 + 500 + user))
    return conversations


def turn_order(spec: WorkloadSpec) -> list[tuple[int, int]]:
    """(round, user) pairs, rounds counted from 1, users interleaved round-robin."""
    return [(round_index, user) for round_index in range(1, spec.num_rounds + 1) for user in range(spec.num_users)]


def warmup_messages(count_tokens: CountTokens, num_tokens: int) -> list[Message]:
    """A request unlike any of the workload's (its own document), to pay one-off costs before timing."""
    document = make_document(999_983, num_tokens, count_tokens)
    return [{"role": "system", "content": INSTRUCTIONS + document.text},
            {"role": "user", "content": make_question(document.towns[0], random.Random(1))}]
