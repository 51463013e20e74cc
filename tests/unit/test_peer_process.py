"""The peer server in a process of its own (``kvtier.tiers.peer_process``): started as the worker
starts it, it prints its port, serves verified entries to a peer holding the secret, refuses one
that does not, never sees kvtier's variables or the key variables, and exits when its stdin closes
or its parent dies. Also ``io_threads``: kvtier's threads leave the engine's CPU binding."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.tiers.disk import DiskFiles, ReadResult
from kvtier.tiers.io_threads import allowed_cpus, parse_cpu_list, unbind_this_thread
from kvtier.tiers.peer_process import child_environment, start_peer_process, stop_peer_process
from kvtier.tiers.peer_tier import PeerTier, StaticPeers

SECRET = bytes(range(32))
LAYOUT = b"L" * 16
NS = "tenant-a"
PAYLOAD_BYTES = 4096


def _payload(i: int) -> bytes:
    return bytes((i * 5 + j) % 251 for j in range(PAYLOAD_BYTES))


@pytest.fixture
def files(tmp_path: Path) -> DiskFiles:
    disk = DiskFiles(str(tmp_path / "disk"), LAYOUT)
    for i in range(3):
        disk.write(i.to_bytes(16, "little"), 0, _payload(i), namespace=NS)
    return disk


@pytest.fixture
def peer(files: DiskFiles) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    env = {**os.environ, "KVTIER_MEMORY_CAPACITY": "1GiB", "PEER_SECRET_VAR": SECRET.hex(), "UNRELATED": "kept"}
    process, port = start_peer_process("127.0.0.1", 0, None, files.root, SECRET,
                                       child_environment(env, ["PEER_SECRET_VAR", None]))
    yield process, port
    stop_peer_process(process)


def _tier(port: int, secret: bytes = SECRET) -> PeerTier:
    return PeerTier(StaticPeers([f"127.0.0.1:{port}"], None), secret, 2.0)


def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
    return process.wait(timeout_s)


def test_it_prints_its_port_and_serves_verified_entries(peer: tuple[subprocess.Popen[bytes], int]) -> None:
    process, port = peer
    assert port > 0 and process.poll() is None
    tier = _tier(port)
    keys = [i.to_bytes(16, "little") for i in range(4)]  # 3 held
    assert tier.exists_prefix(keys, 0, namespace=NS) == 3
    outs = [bytearray(PAYLOAD_BYTES) for _ in keys]
    results = tier.get_many_into([(key, memoryview(out)) for key, out in zip(keys, outs)], 0, LAYOUT, namespace=NS)
    assert results == [ReadResult.OK] * 3 + [ReadResult.MISSING]
    assert [bytes(out) for out in outs[:3]] == [_payload(i) for i in range(3)]
    tier.close()


def test_a_wrong_secret_is_refused(peer: tuple[subprocess.Popen[bytes], int]) -> None:
    tier = _tier(peer[1], secret=b"x" * 32)
    assert tier.exists_prefix([(0).to_bytes(16, "little")], 0, namespace=NS) == 0
    assert tier.num_errors == 1 and not tier.healthy
    tier.close()
    assert peer[0].poll() is None  # a refused client does not stop the server


def test_the_secret_is_in_neither_its_command_line_nor_its_environment(
        peer: tuple[subprocess.Popen[bytes], int]) -> None:
    process = peer[0]
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
                   if b"=" in item)
    assert SECRET.hex().encode() not in cmdline and b"--disk-root" in cmdline
    assert SECRET.hex().encode() not in b"".join(environ.values())
    assert b"PEER_SECRET_VAR" not in environ and not any(name.startswith(b"KVTIER_") for name in environ)
    assert environ[b"UNRELATED"] == b"kept"


def test_it_exits_when_its_stdin_closes(peer: tuple[subprocess.Popen[bytes], int]) -> None:
    process = peer[0]
    assert process.stdin is not None
    process.stdin.close()
    assert _wait_exit(process) == 0


def test_it_exits_when_its_parent_dies(files: DiskFiles, tmp_path: Path) -> None:
    # a parent that starts the peer process, reports its pid, then is killed: the peer process is
    # re-parented (stdin stays open in a grandchild holding it, so only the parent check can stop it)
    script = (
        "import os, sys\n"
        "from kvtier.tiers.peer_process import start_peer_process\n"
        f"p, port = start_peer_process('127.0.0.1', 0, None, {files.root!r}, bytes(range(32)), dict(os.environ))\n"
        "print(p.pid, flush=True)\n"
        "if os.fork() == 0:\n"
        "    import time; time.sleep(8); os._exit(0)\n"  # a child holding the pipe to its stdin
        "os.kill(os.getpid(), 9)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_secret_that_is_not_hex_is_refused(files: DiskFiles) -> None:
    process = subprocess.Popen([sys.executable, "-m", "kvtier.tiers.peer_process", "--host", "127.0.0.1",
                                "--port", "0", "--disk-root", files.root],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(b"not hex\n", timeout=30)
    assert process.returncode == 2 and out == b"" and b"secret" in err


def test_a_taken_port_fails_to_start_with_oserror(files: DiskFiles,
                                                  peer: tuple[subprocess.Popen[bytes], int]) -> None:
    with pytest.raises(OSError, match="did not start listening"):
        start_peer_process("127.0.0.1", peer[1], None, files.root, SECRET, dict(os.environ))


# ---------------------------------------------------------------------------- io_threads

def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8\n") == {0, 1, 2, 3, 8}
    with pytest.raises(ValueError):
        parse_cpu_list("zero")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(allowed_cpus()) < 2, reason="needs 2 CPUs")
def test_a_thread_started_from_a_bound_thread_unbinds_itself() -> None:
    seen: dict[str, set[int]] = {}

    def bound_creator() -> None:
        os.sched_setaffinity(0, {min(allowed_cpus())})  # as vLLM-CPU binds the worker's main thread

        def io_thread() -> None:
            seen["inherited"] = os.sched_getaffinity(0)
            unbind_this_thread()
            seen["after"] = os.sched_getaffinity(0)

        child = threading.Thread(target=io_thread)
        child.start()
        child.join()

    creator = threading.Thread(target=bound_creator)
    creator.start()
    creator.join()
    assert seen["inherited"] == {min(allowed_cpus())}
    assert seen["after"] == allowed_cpus()
