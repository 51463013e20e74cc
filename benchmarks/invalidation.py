"""How long invalidating a namespace takes to reach every tier, and how long it holds the engine.

One engine's books (``TieredStore``) with a memory tier and a disk tier (real files), and a real
Redis (started by ``tests/servers.py``): two namespaces of N entries each, ``victim`` and
``bystander``. ``AdminService.invalidate("victim")`` then reports, cumulatively from its start,
when the memory and disk books, the disk files and the Redis entries were done; "books" is also
the time the engine's scheduler lock was held (the only part that can delay an engine step).
Afterwards the bystander must be untouched on every tier (checked). Medians of R runs per N.

Usage: ``python benchmarks/invalidation.py [--entries 1000,10000] [--repeats 5] [--out PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers: the real servers

import redis  # noqa: E402

from kvtier.admin.service import AdminService, StoreShape  # noqa: E402
from kvtier.keys import Namespace  # noqa: E402
from kvtier.metrics import Metrics  # noqa: E402
from kvtier.plans import WorkerReport  # noqa: E402
from kvtier.store import DiskSettings, TieredStore  # noqa: E402
from kvtier.tiers.disk import DiskFiles  # noqa: E402
from kvtier.tiers.remote import RemoteTier, open_remote  # noqa: E402
from tests import servers  # noqa: E402

LAYOUT = bytes(16)
PAYLOAD = bytes(4096)  # file and value size barely matter: deletes are by name
NAMESPACES = ("victim", "bystander")


def fill(store: TieredStore, disk: DiskFiles, remote: RemoteTier, num_entries: int) -> dict[str, list[bytes]]:
    """``num_entries`` entries per namespace in memory (as many as fit), on disk and in Redis."""
    keys: dict[str, list[bytes]] = {}
    for index, namespace in enumerate(NAMESPACES):
        keys[namespace] = [os.urandom(16) for _ in range(num_entries)]
        for key in keys[namespace]:
            store.prepare_store(key, namespace)
            disk.write(key, 0, PAYLOAD, namespace=namespace)
            assert remote.put(key, 0, PAYLOAD, LAYOUT, namespace=namespace)
        store.complete(WorkerReport(stored=keys[namespace], disk_written=keys[namespace]))
        store.take_ops()
    return keys


def one_run(workdir: Path, redis_port: int, num_entries: int) -> dict[str, float]:
    client = redis.Redis(port=redis_port)
    client.flushall()
    store = TieredStore(num_entries, "lru", DiskSettings(4 * num_entries, write_through=True), 1, Metrics(),
                        len(PAYLOAD), {}, time.time)
    disk = DiskFiles(str(workdir / f"disk-{num_entries}-{time.monotonic_ns()}"), LAYOUT)
    remote = open_remote(f"redis://127.0.0.1:{redis_port}/0", ttl_s=None, timeout_s=30.0)
    keys = fill(store, disk, remote, num_entries)
    service = AdminService(threading.RLock(), store, Namespace("default", "m", LAYOUT),
                           StoreShape(256, len(PAYLOAD), num_entries, 4 * num_entries, 1), disk,
                           open_remote(f"redis://127.0.0.1:{redis_port}/0", ttl_s=None, timeout_s=30.0), lambda: None)
    report = service.invalidate("victim", None)
    memory, disk_report, remote_report = report["memory"], report["disk"], report["remote"]
    assert isinstance(memory, dict) and isinstance(disk_report, dict) and isinstance(remote_report, dict)
    assert disk_report["files"] == num_entries and remote_report["entries"] == num_entries
    assert store.lookup(keys["victim"][:1]).num_chunks == 0
    assert not list((Path(disk.root) / "victim").glob("*/*.kvt"))
    assert not client.keys("kvtier/victim/*")
    # the bystander is untouched everywhere
    assert len(list((Path(disk.root) / "bystander").glob("*/*.kvt"))) == num_entries
    assert len(client.keys("kvtier/bystander/*")) == num_entries
    assert store.tenants.usage()["bystander"].disk == num_entries
    remote.close()
    service.close()
    return {"books_s": float(memory["seconds"]), "disk_files_s": float(disk_report["seconds"]),
            "redis_s": float(remote_report["seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="1000,10000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "invalidation_cpu.json"))
    args = parser.parse_args()
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                                  "repeats": args.repeats, "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        server = servers.redis_like(servers.redis_server_binary(), workdir / "redis", servers.free_ports(1)[0])
        server.start()
        try:
            for num_entries in (int(text) for text in args.entries.split(",")):
                runs = [one_run(workdir, servers.port_of(server), num_entries) for _ in range(args.repeats)]
                medians = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
                results["runs"][str(num_entries)] = medians  # type: ignore[index]
                print(f"{num_entries:>6} entries per tier: books (engine lock) {medians['books_s'] * 1e3:.1f} ms, "
                      f"+ disk files {medians['disk_files_s'] * 1e3:.1f} ms, + Redis {medians['redis_s'] * 1e3:.1f} ms "
                      f"(cumulative, medians of {args.repeats})", flush=True)
        finally:
            server.stop()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
