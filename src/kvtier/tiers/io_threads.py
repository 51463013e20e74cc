"""kvtier's background I/O threads run on every core the process may use, not the engine's.

vLLM-CPU binds its OpenMP threads one per core (``vllm/utils/ompmultiprocessing.py`` sets
``OMP_PLACES``/``OMP_PROC_BIND``, ``GOMP_CPU_AFFINITY`` or ``KMP_AFFINITY`` for each worker), and
the worker's main thread is OpenMP's first thread, bound to the first core of its list. On Linux a
new thread starts with its creator's CPU affinity, so every thread kvtier starts from the worker
(fill, lookup, upload, disk writer, heartbeat, S3 pool, peer server) was bound to that one core,
behind the engine's busiest thread (measured: every kvtier thread of a ``vllm serve`` worker had
``Cpus_allowed_list: 0`` on a 2-core machine; docs/fleet.md). A process started from such a thread
inherits the binding too.

``unbind_this_thread`` undoes it for the calling thread: call it first thing in every background
thread kvtier starts (``ThreadPoolExecutor(initializer=unbind_this_thread)``). It leaves OpenMP and
torch alone: kvtier's threads run no torch operations and no OpenMP regions (this package never
imports torch), so there is no thread pool of theirs to unbind.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def allowed_cpus() -> set[int]:
    """Every CPU this process may run on: the cgroup's cpuset where it says, else all CPUs (the
    kernel limits an affinity to the cpuset anyway)."""
    for path in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/fs/cgroup/cpuset/cpuset.effective_cpus"):
        try:
            with open(path, encoding="ascii") as file:
                cpus = parse_cpu_list(file.read())
        except (OSError, ValueError):
            continue
        if cpus:
            return cpus
    return set(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> set[int]:
    """``"0-3,8"`` -> {0, 1, 2, 3, 8}; ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def unbind_this_thread() -> bool:
    """Let the calling thread run on every allowed CPU. False (and a debug line) where the
    platform has no CPU affinity or refuses; never raises."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, allowed_cpus())
    except OSError as exc:  # a cpuset that changed under us, or a seccomp filter
        logger.debug("kvtier: cannot reset this thread's CPU affinity: %s", exc)
        return False
    return True
