"""CPU seconds (user + system) a process and all its live descendants have used so far.

The engine server is three processes (API server, EngineCore, Worker); the bench reads their sum
before and after a repeat, so the difference is the engine's compute for that repeat's requests.
psutil is used when installed, else ``/proc`` (Linux). Processes that exit between two readings
are lost from the sum: the engine's processes live as long as the server.
"""

from __future__ import annotations

import os


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its descendants; None if ``pid`` is gone or
    neither psutil nor ``/proc`` can tell."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_cpu_s(pid)
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total_s = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # exited meanwhile
        total_s += times.user + times.system
    return total_s


def _proc_tree_cpu_s(pid: int) -> float | None:
    stats = _proc_stats()
    if pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    ticks, stack = 0, [pid]
    while stack:
        current = stack.pop()
        ticks += stats[current][1]
        stack.extend(children.get(current, []))
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, utime + stime in clock ticks), from every readable ``/proc/PID/stat``."""
    stats = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if name.isdigit():
            parsed = parse_proc_stat(_read(f"/proc/{name}/stat"))
            if parsed is not None:
                stats[int(name)] = parsed
    return stats


def parse_proc_stat(text: str) -> tuple[int, int] | None:
    """(parent pid, utime + stime) from the text of ``/proc/PID/stat``; None if malformed. The
    command name (field 2) may contain spaces and parentheses, so fields are counted after its last ')'."""
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) < 13:
        return None
    try:
        return int(fields[1]), int(fields[11]) + int(fields[12])
    except ValueError:
        return None


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""
