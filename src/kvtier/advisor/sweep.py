"""Replays of one workload at several sizes, spread over worker processes.

The replays of a sweep are independent (each opens its own ``KVManager``) and deterministic, so
they run in parallel with the same results as one after another. Workers are forked: they inherit
the workload, the engine's hits and the settings read once by the parent (``_SHARED`` is set in each
worker by the pool's initializer, before any replay), and send back only their ``ReplayResult``.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from kvtier.advisor.simulate import KvtierSettings, ReplayResult, TierSizes, replay
from kvtier.advisor.workload import Workload

_SHARED: dict[str, object] = {}  # in a worker process only: what its replays read


def default_jobs() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _init(workload: Workload, engine_hits: list[int], settings: KvtierSettings) -> None:
    _SHARED.update(workload=workload, engine_hits=engine_hits, settings=settings)


def _replay_shared(sizes: TierSizes) -> ReplayResult:
    workload, hits, settings = _SHARED["workload"], _SHARED["engine_hits"], _SHARED["settings"]
    assert isinstance(workload, Workload) and isinstance(hits, list) and isinstance(settings, KvtierSettings)
    return replay(workload, hits, settings, sizes)


def replay_sizes(workload: Workload, engine_hits: list[int], settings: KvtierSettings, sizes: list[TierSizes],
                 jobs: int) -> list[ReplayResult]:
    """``replay`` at each of ``sizes``, in order, on up to ``jobs`` processes (1: in this process;
    also where fork is not available)."""
    jobs = min(jobs, len(sizes))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [replay(workload, engine_hits, settings, size) for size in sizes]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init,
                             initargs=(workload, engine_hits, settings)) as pool:
        return list(pool.map(_replay_shared, sizes))
