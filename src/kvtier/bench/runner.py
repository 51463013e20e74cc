"""Run one workload against every configuration: start servers, warm up, repeat, measure.

Each configuration gets its own server, started once and warmed up once (random tokens, not
counted: one long request, then a burst of concurrent short ones). A repeat sends the whole
workload with a cache salt of its own (``cache_salt``), so vLLM's prefix cache and kvtier's tiers
start cold for every repeat of every configuration without a restart. Around each repeat the
bench reads the server's process-tree CPU seconds and kvtier's Prometheus counters; the
differences belong to that repeat.

Order ``interleaved`` (default) keeps every server up and runs repeat 1 of every configuration,
then repeat 2, ... rotating which goes first, so a machine that gets busier or quieter during the
run affects all configurations alike. ``sequential`` runs one server at a time (less memory).

A configuration that fails (server does not start, e.g. an unknown kvtier key; or dies) is
recorded with the error line of its log, and the others go on.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.bench.client import RequestOptions, fetch_text, served_model
from kvtier.bench.configs import (BenchConfig, KvTransferJson, kvtier_inline_keys, log_path_for,
                                  server_spec)
from kvtier.bench.cputime import process_tree_cpu_s
from kvtier.bench.dispatch import DispatchOutcome, Target, dispatch
from kvtier.bench.scrape import by_tier, parse_samples
from kvtier.bench.server import ServerProcess, free_port
from kvtier.bench.specs import BenchRequest, ModelInfo, TokenPrompt, Workload, random_token_ids
from kvtier.errors import ServerError

Progress = Callable[[str], None]
MetricTable = dict[str, dict[str, float]]
_COUNTER_SUFFIXES = ("_total", "_sum", "_count")


@dataclass(frozen=True)
class RunSettings:
    out_dir: str
    log_dir: str  # one server log per configuration
    repeats: int
    order: str  # "interleaved" or "sequential"
    max_concurrency: int
    request_timeout_s: float
    startup_timeout_s: float
    engine_kv_tokens: int
    warmup_tokens: int
    settle_s: float = 1.0  # wait after a repeat before reading counters (disk writes finish late)
    engine_extra_args: tuple[str, ...] = ()  # vLLM arguments passed through after ``--``


@dataclass(frozen=True)
class ExternalServer:
    """A server the user started (``--url``): one configuration, measured as far as it lets us."""

    name: str
    base_url: str
    metrics_url: str | None
    pid: int | None  # for CPU seconds, when it runs on this machine


@dataclass
class RepeatMeasure:
    repeat: int
    outcome: DispatchOutcome
    cpu_s: float | None  # engine process tree, over this repeat
    metrics: MetricTable | None  # kvtier counters, increase over this repeat


@dataclass
class ConfigRun:
    name: str
    uses_kvtier: bool
    log_path: str | None
    startup_s: float | None = None
    warmup_requests_s: float | None = None
    repeats: list[RepeatMeasure] = field(default_factory=list)
    error: str | None = None


@dataclass
class _Session:
    run: ConfigRun
    target: Target
    pid: int | None
    metrics_url: str | None
    server: ServerProcess | None


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def _start(config: BenchConfig, model: ModelInfo, settings: RunSettings, kv_json: KvTransferJson,
           scratch_dir: str, run_id: str, stack: contextlib.ExitStack, progress: Progress) -> _Session:
    """Start and warm up one configuration's server (entered into ``stack``). Raises ServerError."""
    run = ConfigRun(config.name, config.uses_kvtier, log_path_for(settings.log_dir, config.name))
    metrics_url, transfer_json = None, None
    if config.uses_kvtier:
        metrics_port = free_port()
        disk_dir = os.path.join(scratch_dir, config.name.replace("+", "_"), "disk")
        keys = kvtier_inline_keys(config, metrics_port, disk_dir, f"bench-{run_id}")
        transfer_json = kv_json(keys)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    assert run.log_path is not None
    spec = server_spec(config, model.served_name, free_port(), settings.engine_kv_tokens * model.kv_bytes_per_token,
                       transfer_json, run.log_path, os.environ, settings.engine_extra_args)
    progress(f"[{config.name}] starting vLLM (log: {run.log_path})")
    server = stack.enter_context(ServerProcess(spec, os.environ))
    try:
        run.startup_s = server.wait_ready(settings.startup_timeout_s, lambda m: progress(f"[{config.name}] {m}"))
        session = _Session(run, Target(spec.base_url, model.served_name), server.pid, metrics_url, server)
        _warm_up(session, model, settings, run_id, progress)
    except ServerError:
        server.stop()  # do not leave a broken server running beside the others
        raise
    return session


def _external(server: ExternalServer, model: ModelInfo, settings: RunSettings, run_id: str,
              progress: Progress) -> _Session:
    run = ConfigRun(server.name, server.metrics_url is not None, None)
    target = Target(server.base_url.rstrip("/"), served_model(server.base_url, timeout_s=10))
    session = _Session(run, target, server.pid, server.metrics_url, None)
    _warm_up(session, model, settings, run_id, progress)
    return session


def _warm_up(session: _Session, model: ModelInfo, settings: RunSettings, run_id: str, progress: Progress) -> None:
    """Pay one-off costs before timing: one request of ``warmup_tokens`` random tokens, then a burst
    of ``max_concurrency`` (at least 2) shorter ones at once, so batches of several requests have
    been seen too. Unlike any request of the workload (own tokens, own salt). Raises ServerError."""
    options = RequestOptions(ignore_eos=True, cache_salt=f"kvtier-bench-{run_id}-warmup")

    def request(index: int, num_tokens: int) -> BenchRequest:
        prompt = TokenPrompt(random_token_ids(999_983 + index, num_tokens, model.token_id_range))
        return BenchRequest(index, 0.0, None if index == 0 else 0, 1, prompt, 8)

    num_burst = max(2, settings.max_concurrency)
    burst = tuple(request(i, max(settings.warmup_tokens // 4, 1)) for i in range(1, num_burst + 1))
    outcome = dispatch(session.target, (request(0, settings.warmup_tokens), *burst), options, num_burst,
                       settings.request_timeout_s, lambda message: None)
    if outcome.failures:
        raise ServerError(f"{session.run.name}: warm-up request failed: {outcome.failures[0].error}")
    session.run.warmup_requests_s = outcome.wall_s
    startup = "" if session.run.startup_s is None else f"started in {session.run.startup_s:.1f} s, "
    progress(f"[{session.run.name}] {startup}warm-up {outcome.wall_s:.2f} s ({len(burst) + 1} requests, "
             "not counted)")


def _scrape(url: str | None, progress: Progress) -> MetricTable | None:
    if url is None:
        return None
    try:
        return by_tier(parse_samples(fetch_text(url, timeout_s=10)))
    except ServerError as exc:
        progress(f"kvtier metrics unavailable ({exc}): its hit rates will read n/a")
        return None


def metrics_increase(before: MetricTable | None, after: MetricTable | None) -> MetricTable | None:
    """Counters (``*_total``, ``*_sum``, ``*_count``) of ``after`` minus ``before``, per tier; gauges
    are left out. None if either reading is missing."""
    if before is None or after is None:
        return None
    return {name: {tier: number - before.get(name, {}).get(tier, 0.0) for tier, number in row.items()}
            for name, row in after.items() if name.endswith(_COUNTER_SUFFIXES)}


def _cpu_increase(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _repeat(session: _Session, workload: Workload, repeat: int, settings: RunSettings, run_id: str,
            progress: Progress) -> None:
    """One pass over the workload; appends a RepeatMeasure. Raises ServerError if the server died."""
    def say(message: str) -> None:
        progress(f"[{session.run.name}] repeat {repeat}/{settings.repeats}: {message}")

    options = RequestOptions(ignore_eos=True, cache_salt=f"kvtier-bench-{run_id}-r{repeat}")
    metrics_before = _scrape(session.metrics_url, progress)
    cpu_before = _cpu(session)  # after the scrape: its CPU must not count for kvtier only
    outcome = dispatch(session.target, workload.requests, options, settings.max_concurrency,
                       settings.request_timeout_s, say)
    cpu_s = _cpu_increase(cpu_before, _cpu(session))  # read before the settle time, for every configuration
    if session.metrics_url is not None:
        time.sleep(settings.settle_s)
    if session.server is not None:
        session.server.check_alive()
    measure = RepeatMeasure(repeat, outcome, cpu_s, metrics_increase(metrics_before, _scrape(session.metrics_url,
                                                                                               progress)))
    session.run.repeats.append(measure)
    ttfts = sorted(result.ttft_s for result in outcome.results)
    median = ttfts[len(ttfts) // 2] if ttfts else math.nan
    failed = f", {len(outcome.failures)} FAILED ({outcome.failures[0].error})" if outcome.failures else ""
    say(f"{len(outcome.results)} answered in {outcome.wall_s:.1f} s, median TTFT {median * 1000:.0f} ms{failed}")


def _cpu(session: _Session) -> float | None:
    return None if session.pid is None else process_tree_cpu_s(session.pid)


def _fail(run: ConfigRun, exc: ServerError, progress: Progress) -> None:
    run.error = str(exc)
    progress(f"[{run.name}] FAILED: {exc}")


def run_configs(configs: list[BenchConfig], workload: Workload, model: ModelInfo, settings: RunSettings,
                kv_json: KvTransferJson, scratch_dir: str, progress: Progress) -> list[ConfigRun]:
    """Start, warm up and measure every configuration (see the module docstring); servers are
    stopped on any exit, Ctrl-C included. Failures are recorded in the returned runs."""
    run_id = new_run_id()
    if settings.order == "sequential":
        return [_run_one(config, workload, model, settings, kv_json, scratch_dir, run_id, progress)
                for config in configs]
    with contextlib.ExitStack() as stack:
        sessions, runs = [], []
        for config in configs:
            try:
                sessions.append(_start(config, model, settings, kv_json, scratch_dir, run_id, stack, progress))
                runs.append(sessions[-1].run)
            except ServerError as exc:
                runs.append(ConfigRun(config.name, config.uses_kvtier, log_path_for(settings.log_dir, config.name)))
                _fail(runs[-1], exc, progress)
        _interleave(sessions, workload, settings, run_id, progress)
        return runs


def _interleave(sessions: list[_Session], workload: Workload, settings: RunSettings, run_id: str,
                progress: Progress) -> None:
    for repeat in range(1, settings.repeats + 1):
        live = [session for session in sessions if session.run.error is None]
        shift = (repeat - 1) % max(len(live), 1)
        for session in live[shift:] + live[:shift]:
            try:
                _repeat(session, workload, repeat, settings, run_id, progress)
            except ServerError as exc:
                _fail(session.run, exc, progress)


def _run_one(config: BenchConfig, workload: Workload, model: ModelInfo, settings: RunSettings,
             kv_json: KvTransferJson, scratch_dir: str, run_id: str, progress: Progress) -> ConfigRun:
    with contextlib.ExitStack() as stack:
        try:
            session = _start(config, model, settings, kv_json, scratch_dir, run_id, stack, progress)
        except ServerError as exc:
            run = ConfigRun(config.name, config.uses_kvtier, log_path_for(settings.log_dir, config.name))
            _fail(run, exc, progress)
            return run
        for repeat in range(1, settings.repeats + 1):
            try:
                _repeat(session, workload, repeat, settings, run_id, progress)
            except ServerError as exc:
                _fail(session.run, exc, progress)
                break
        return session.run


def run_external(server: ExternalServer, workload: Workload, model: ModelInfo, settings: RunSettings,
                 progress: Progress) -> list[ConfigRun]:
    """Measure a server given by URL: one configuration. Raises ServerError if it cannot be warmed up."""
    run_id = new_run_id()
    session = _external(server, model, settings, run_id, progress)
    for repeat in range(1, settings.repeats + 1):
        _repeat(session, workload, repeat, settings, run_id, progress)
    return [session.run]
