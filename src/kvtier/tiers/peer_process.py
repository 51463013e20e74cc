"""The peer server in a process of its own, so that serving peers never waits on the engine.

    python -m kvtier.tiers.peer_process --host HOST --port PORT [--advertise HOST:PORT] --disk-root DIR

Started by the worker of rank 0 (``start_peer_process``; ``integrations/vllm/peers.PeerService``)
and serving that worker's disk-tier files under ``DIR`` (``DiskSource``) with ``PeerServer``.
The protocol between the two processes:

- stdin: the first line is the shared secret, hex-encoded. The secret never appears in the
  command line or the environment (``/proc/<pid>/cmdline`` and ``environ`` are readable by other
  processes of the same user, and environments are inherited). stdin then stays open: end of
  file (the worker closed it, or died) makes the process exit.
- stdout: one line, ``listening <port>``, once the port is bound (port 0: the one the kernel
  chose); nothing else.
- stderr: log lines.
- It also exits when its parent changes (the worker died and it was re-parented), checked every
  ``PARENT_CHECK_S``. Exit code 0 when it was asked to stop, 2 for bad arguments or a secret
  that is not hex (at least 32 bytes), 3 when the address cannot be bound.

The worker starts it with ``child_environment``: the environment without kvtier's variables and
without the variables holding keys (``p2p.key_env``, ``encryption.key_env``, ``signing.key_env``).
It resets its CPU affinity first (``io_threads``): a process inherits the binding of the thread
that started it, and the worker's threads are bound to the engine's cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

from kvtier.tiers.io_threads import unbind_this_thread
from kvtier.tiers.peer_server import DiskSource, PeerServer

logger = logging.getLogger(__name__)

PARENT_CHECK_S = 0.5
MIN_SECRET_BYTES = 32
START_TIMEOUT_S = 30.0
EXIT_BAD_INPUT = 2
EXIT_CANNOT_BIND = 3


def child_environment(environ: Mapping[str, str], key_envs: Iterable[str | None]) -> dict[str, str]:
    """``environ`` without ``KVTIER_*`` variables and without the variables named in ``key_envs``."""
    secret_names = {name for name in key_envs if name}
    return {name: value for name, value in environ.items()
            if not name.startswith("KVTIER_") and name not in secret_names}


def start_peer_process(host: str, port: int, advertised: str | None, disk_root: str, secret: bytes,
                       env: Mapping[str, str], timeout_s: float = START_TIMEOUT_S) -> tuple[subprocess.Popen[bytes], int]:
    """Start the peer process and wait for its port. Returns the process (its stdin held open:
    closing it stops the process) and the port. ``OSError`` when it does not start listening
    within ``timeout_s`` (the address taken, say); the process is then stopped."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kvtier.tiers.peer_process", "--host", host, "--port", str(port),
         *(("--advertise", advertised) if advertised else ()), "--disk-root", disk_root],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(env), close_fds=True)
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(secret.hex().encode("ascii") + b"\n")
        process.stdin.flush()
        line = _read_line(process.stdout, timeout_s)
        word, _, number = line.decode("ascii", errors="replace").strip().partition(" ")
        if word != "listening" or not number.isdigit():
            code = process.poll()
            raise OSError(f"the peer process did not start listening on {host}:{port}"
                          f" ({'exit code ' + str(code) if code is not None else repr(line[:80])}; see its log)")
    except BaseException:
        stop_peer_process(process)
        raise
    return process, int(number)


def stop_peer_process(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Close its stdin (it exits), then kill it if it is still there after ``timeout_s``."""
    if process.stdin is not None and not process.stdin.closed:
        try:
            process.stdin.close()
        except OSError:
            pass
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _read_line(stream: IO[bytes], timeout_s: float) -> bytes:
    """One line from a pipe, or what came before ``timeout_s`` passed or the pipe closed."""
    deadline = time.monotonic() + timeout_s
    line = b""
    fd = stream.fileno()
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line


# ---------------------------------------------------------------------------- the process

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvtier.tiers.peer_process",
                                     description="Serve a kvtier disk tier's entries to authenticated peers.")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--advertise", default=None,
                        help="the host:port peers dial; clients that dialled another are refused (default: "
                             "HOST and the bound port)")
    parser.add_argument("--disk-root", required=True, help="the disk tier's directory for this KV layout")
    return parser.parse_args(argv)


def read_secret(stdin: IO[bytes]) -> bytes:
    """The first line of stdin as hex; ValueError when it is not at least ``MIN_SECRET_BYTES``."""
    secret = bytes.fromhex(stdin.readline().decode("ascii").strip())
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret is {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed")
    return secret


def main(argv: Sequence[str] | None = None) -> int:
    unbind_this_thread()  # before any thread starts: they inherit it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the worker decides
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="kvtier peer process: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    try:
        secret = read_secret(sys.stdin.buffer)
    except (ValueError, UnicodeDecodeError) as exc:
        logger.error("no usable secret on stdin: %s", exc)
        return EXIT_BAD_INPUT
    try:
        server = PeerServer(args.host, args.port, secret, DiskSource(args.disk_root), args.advertise)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return EXIT_CANNOT_BIND
    stop = threading.Event()
    threading.Thread(target=_wait_for_eof, args=(sys.stdin.buffer, stop), name="kvtier-peer-stdin",
                     daemon=True).start()
    sys.stdout.write(f"listening {server.port}\n")
    sys.stdout.flush()
    while not stop.wait(PARENT_CHECK_S):
        if os.getppid() != parent:
            logger.info("the worker that started this process is gone; stopping")
            break
    server.close()
    return 0


def _wait_for_eof(stdin: IO[bytes], stop: threading.Event) -> None:
    while stdin.read(4096):
        pass
    stop.set()


if __name__ == "__main__":
    sys.exit(main())
