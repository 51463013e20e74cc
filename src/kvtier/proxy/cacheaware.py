"""Cache-aware routing: each request goes where its prompt's longest prefix is cached (any local
tier: vLLM's GPU blocks, kvtier's memory and disk), balanced by load, skipping dead instances.

- What is cached where: the instances' KV events (``feed.EventFeed`` -> ``index.PrefixIndex``).
- The prompt's tokens: a completion's ``prompt`` when it is token ids, else the instance's own
  ``/tokenize`` (the engine's tokenizer and chat template; one short request).
- Load: each instance's ``vllm:num_requests_waiting`` from its ``/metrics`` (polled every
  ``poll_s``), plus the requests this proxy has in flight there.
- Dead: an instance whose ``/metrics`` or relay fails is skipped for ``routing.DOWN_S``.
``choose`` is the decision, a pure function: the least ``cost``, where cost is the prompt tokens
the instance would have to compute plus ``tokens_per_queued`` for each request ahead of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvtier.proxy.bodies import Upstream
from kvtier.proxy.feed import EventFeed
from kvtier.proxy.index import PrefixIndex
from kvtier.proxy.routing import DownList

logger = logging.getLogger("kvtier.proxy")

TOKENS_PER_QUEUED = 512  # what one request ahead in the queue costs, in prompt tokens to compute
POLL_S = 0.5
WAITING_METRIC = "vllm:num_requests_waiting"


@dataclass(frozen=True)
class Candidate:
    """One live instance as the router sees it for one request."""

    upstream: Upstream
    matched_tokens: int  # the prompt's longest prefix it holds on a local tier
    num_waiting: int  # requests waiting in its queue (its metrics)
    num_in_flight: int  # requests this proxy sent it that have not ended


def cost(candidate: Candidate, num_prompt_tokens: int, tokens_per_queued: int) -> int:
    uncached = max(num_prompt_tokens - candidate.matched_tokens, 0)
    return uncached + tokens_per_queued * (candidate.num_waiting + candidate.num_in_flight)


def choose(candidates: Sequence[Candidate], num_prompt_tokens: int,
           tokens_per_queued: int = TOKENS_PER_QUEUED) -> Upstream:
    """The candidate of least cost; ties go to the earliest (callers rotate the order)."""
    if not candidates:
        raise ValueError("no instance to choose from")
    return min(candidates, key=lambda c: cost(c, num_prompt_tokens, tokens_per_queued)).upstream


def parse_waiting(metrics_text: str) -> int:
    """The sum of ``vllm:num_requests_waiting`` samples in a Prometheus text exposition;
    ``ValueError`` for text that is not one."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        total += sum(sample.value for sample in family.samples if sample.name == WAITING_METRIC)
    return int(total)


class CacheAwareRouter:
    """``Router`` over ``upstreams``, fed by their KV events from ``events`` (one endpoint per
    instance, same order; see ``feed``)."""

    def __init__(self, upstreams: Sequence[Upstream], events: Sequence[str],
                 tokens_per_queued: int = TOKENS_PER_QUEUED, poll_s: float = POLL_S) -> None:
        if not upstreams or len(events) != len(upstreams):
            raise ValueError("cache-aware routing needs one events endpoint per instance")
        self.upstreams = tuple(upstreams)
        self.index = PrefixIndex()
        self.feed = EventFeed({u.url: endpoint for u, endpoint in zip(upstreams, events)}, self.index)
        self.down = DownList()
        self.waiting: dict[Upstream, int] = {u: 0 for u in upstreams}
        self.in_flight: Counter[Upstream] = Counter()
        self.tokens_per_queued = tokens_per_queued
        self.poll_s = poll_s
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._turn = 0

    async def start(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self.feed.open()
        self._tasks = [asyncio.create_task(self.feed.run()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.feed.close()

    async def route(self, path: str, body: Mapping[str, object] | None, headers: Mapping[str, str]) -> Upstream:
        alive = self.down.alive(self._rotated())
        token_ids = None if body is None else await self._tokens(path, body, headers, alive)
        lora_name = None if body is None else self.index.adapter_named(body.get("model"))
        matched = self.index.matched_tokens(token_ids, [u.url for u in alive], lora_name) if token_ids else {}
        candidates = [Candidate(u, matched.get(u.url, 0), self.waiting.get(u, 0), self.in_flight[u]) for u in alive]
        target = choose(candidates, len(token_ids or []), self.tokens_per_queued)
        self.in_flight[target] += 1
        return target

    def done(self, upstream: Upstream) -> None:
        if self.in_flight[upstream] > 0:
            self.in_flight[upstream] -= 1

    def failed(self, upstream: Upstream) -> None:
        self.down.mark(upstream)

    def _rotated(self) -> list[Upstream]:
        self._turn = (self._turn + 1) % len(self.upstreams)
        return [*self.upstreams[self._turn:], *self.upstreams[:self._turn]]

    async def _tokens(self, path: str, body: Mapping[str, object], headers: Mapping[str, str],
                      alive: Sequence[Upstream]) -> list[int] | None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < 2**32 for t in prompt):
            return list(prompt)  # token ids (anything else is left to the instance to refuse)
        request: dict[str, object] = {"model": body.get("model")}
        if path.endswith("/chat/completions") and isinstance(body.get("messages"), list):
            request.update(messages=body["messages"], add_generation_prompt=True)
        elif isinstance(prompt, str):
            request["prompt"] = prompt
        else:
            return None
        assert self._client is not None
        upstream = min(alive, key=lambda u: self.in_flight[u])
        try:
            response = await self._client.post(f"{upstream.url}/tokenize", json=request, headers=dict(headers))
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            logger.debug("kvtier proxy: /tokenize on %s failed: %r", upstream, exc)
            return None
        return tokens if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens) else None

    async def _poll(self) -> None:
        """Every ``poll_s``: each instance's queue length; an instance that does not answer is down."""
        assert self._client is not None
        while True:
            await asyncio.gather(*(self._poll_one(u) for u in self.upstreams))
            await asyncio.sleep(self.poll_s)

    async def _poll_one(self, upstream: Upstream) -> None:
        assert self._client is not None
        try:
            response = await self._client.get(f"{upstream.url}/metrics", timeout=max(self.poll_s * 4, 1.0))
            response.raise_for_status()
        except httpx.HTTPError:
            self.down.mark(upstream)
            return
        try:
            self.waiting[upstream] = parse_waiting(response.text)
        except ValueError:  # not a Prometheus text: keep the last length; the poll goes on
            logger.warning("kvtier proxy: %s/metrics is not Prometheus text", upstream.url)
