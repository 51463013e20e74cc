"""Fetching a prefix from a remote tier: kvtier's ``get_many_into`` vs the raw client, same run.

For each backend (Redis, Redis Cluster, Valkey, S3 on SeaweedFS; real servers started by
``tests/servers.py``), N entries of one chunk each are stored with ``RemoteTier.put``; then, in
alternating order, R times each:
- kvtier: ``get_many_into`` the N chunks into preallocated buffers (verified: header, checksum);
- raw: a default client fetching the same N values as bytes, no checks: redis-py ``MGET``
  (``mget_nonatomic`` on a cluster) and a pipeline of GETs; boto3 ``get_object(...).read()`` on
  a pool of threads (as many as kvtier uses).
The ratio is throughput(kvtier) / throughput(best raw method) = raw median / kvtier median;
the floor to pass is 0.7.

Usage: ``python benchmarks/remote_get.py [--chunks 16] [--chunk-bytes 5900000] [--repeats 7]
[--backends redis,redis-cluster,valkey,s3] [--out PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers: the real servers

import redis  # noqa: E402
from redis.cluster import RedisCluster  # noqa: E402

from kvtier.tiers.disk import ReadResult  # noqa: E402
from kvtier.tiers.remote import RemoteTier, open_remote  # noqa: E402
from tests import servers  # noqa: E402

LAYOUT = bytes(range(16))
NAMESPACE = "bench"
FLOOR = 0.7
S3_THREADS = 4  # kvtier.tiers.s3_tier uses 4


def timed_s(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@contextmanager
def start_backend(name: str, workdir: Path) -> Iterator[tuple[Callable[[], RemoteTier],
                                                              dict[str, Callable[[list[str]], object]]]]:
    """(open the kvtier tier, raw fetchers by method name) for a freshly started server."""
    with ExitStack() as stack:
        if name in ("redis", "valkey"):
            binary = servers.redis_server_binary() if name == "redis" else servers.valkey_server_binary()
            port = servers.free_ports(1)[0]
            server = servers.redis_like(binary, workdir / name, port, name=name)
            server.start()
            stack.callback(server.stop)
            raw = redis.Redis(port=port)
            yield (lambda: open_redis(f"redis://127.0.0.1:{port}"),
                   {"mget": raw.mget, "pipeline": lambda names: pipeline_get(raw, names)})
        elif name == "redis-cluster":
            nodes = stack.enter_context(servers.redis_cluster(servers.redis_server_binary(), workdir / name))
            ports = [servers.port_of(node) for node in nodes]
            cluster = RedisCluster(host="127.0.0.1", port=ports[0])
            yield (lambda: open_redis("redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)),
                   {"mget_nonatomic": cluster.mget_nonatomic, "pipeline": lambda names: pipeline_get(cluster, names)})
        else:
            server, endpoint = servers.seaweed_s3(workdir / name)
            server.start()
            stack.callback(server.stop)
            client = servers.s3_client(endpoint, timeout_s=30.0)
            pool = stack.enter_context(ThreadPoolExecutor(S3_THREADS))
            fetch = lambda names: list(pool.map(  # noqa: E731
                lambda key: client.get_object(Bucket=servers.S3_BUCKET, Key=key)["Body"].read(), names))
            open_s3 = lambda: open_remote(  # noqa: E731
                f"s3://{servers.S3_BUCKET}/bench", ttl_s=None, timeout_s=30.0, s3_endpoint=endpoint,
                s3_region="us-east-1", access_key=servers.S3_ACCESS_KEY, secret_key=servers.S3_SECRET_KEY)
            yield open_s3, {"get_object_threads": fetch}


def open_redis(url: str) -> RemoteTier:
    return open_remote(url, ttl_s=None, timeout_s=30.0)


def pipeline_get(client: redis.Redis | RedisCluster, names: list[str]) -> list[bytes | None]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    return pipe.execute()


def run_backend(name: str, workdir: Path, num_chunks: int, chunk_bytes: int, repeats: int) -> dict[str, object]:
    with start_backend(name, workdir) as (open_tier, raw_methods):
        tier = open_tier()
        keys = [os.urandom(16) for _ in range(num_chunks)]
        for key in keys:
            assert tier.put(key, 0, os.urandom(chunk_bytes), LAYOUT, namespace=NAMESPACE), f"{name}: put failed"
        names = [tier.name_for(key, 0, NAMESPACE) for key in keys]
        outs = [memoryview(bytearray(chunk_bytes)) for _ in keys]
        items = list(zip(keys, outs))

        def kvtier_get() -> None:
            assert tier.get_many_into(items, 0, LAYOUT, namespace=NAMESPACE) == [ReadResult.OK] * num_chunks

        for method in raw_methods.values():  # warm-up: connections, first-touch of buffers
            method(names)
        kvtier_get()
        kvtier_times, raw_times = [], {method: [] for method in raw_methods}
        for index in range(repeats):  # alternate the order so drift hits both sides alike
            order = [("kvtier", kvtier_get), *((method, lambda m=m: m(names)) for method, m in raw_methods.items())]
            for label, call in (order if index % 2 == 0 else order[::-1]):
                (kvtier_times if label == "kvtier" else raw_times[label]).append(timed_s(call))
        tier.close()
    kvtier_s = statistics.median(kvtier_times)
    raw_s = {method: statistics.median(times) for method, times in raw_times.items()}
    best = min(raw_s, key=raw_s.__getitem__)
    total_bytes = num_chunks * chunk_bytes
    return {"backend": name, "kvtier_median_s": kvtier_s, "kvtier_gb_per_s": total_bytes / kvtier_s / 1e9,
            "raw_median_s": raw_s, "raw_best_method": best, "raw_gb_per_s": total_bytes / raw_s[best] / 1e9,
            "ratio_kvtier_over_raw": raw_s[best] / kvtier_s, "passes_floor": raw_s[best] / kvtier_s >= FLOOR}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-bytes", type=int, default=5_900_000)  # SmolLM2-135M, 256-token chunk, bf16
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", default="redis,redis-cluster,valkey,s3")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "remote_get.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as workdir:
        for name in args.backends.split(","):
            result = run_backend(name, Path(workdir), args.chunks, args.chunk_bytes, args.repeats)
            results.append(result)
            raw = ", ".join(f"{method} {seconds * 1e3:.1f} ms" for method, seconds in result["raw_median_s"].items())
            print(f"{name:14s} kvtier {result['kvtier_median_s'] * 1e3:7.1f} ms ({result['kvtier_gb_per_s']:.2f} GB/s)"
                  f" | raw {raw} | ratio {result['ratio_kvtier_over_raw']:.2f} (floor {FLOOR})", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump({"chunks": args.chunks, "chunk_bytes": args.chunk_bytes, "repeats": args.repeats, "floor": FLOOR,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, loopback",
                   "date": time.strftime("%Y-%m-%d"), "results": results}, out, indent=2)
        out.write("\n")


if __name__ == "__main__":
    main()
