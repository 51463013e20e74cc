"""Issue 16 #8, the real servers: ``held_ages`` says how long ago each held entry was written, so a
fetch into memory keeps the entry's age (tests/unit/test_ttl_on_fetch.py). Redis keeps no write
time: the age is the TTL the entry was written with less its PTTL. S3: Date less Last-Modified
(whole seconds)."""

from __future__ import annotations

import time

from kvtier.tiers.remote import open_remote
from tests.remote_backends import s3_backend
from tests.servers import ServerProcess, fresh_redis, port_of, seaweed  # noqa: F401  (fixtures)

LAYOUT = b"\x07" * 16
NS = "tenant-a"


def test_redis_ages_come_from_the_ttl_left(fresh_redis: ServerProcess) -> None:
    tier = open_remote(f"redis://127.0.0.1:{port_of(fresh_redis)}/0", ttl_s=3600, timeout_s=2.0)
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    for key in keys[:2]:
        assert tier.put(key, 0, bytes(64), LAYOUT, namespace=NS, ttl_s=30)  # the namespace's TTL: 30 s
    time.sleep(1.2)
    ages = tier.held_ages(keys, 0, namespace=NS, max_age_s=30)
    assert len(ages) == 2 and all(1.0 <= age <= 2.5 for age in ages), ages
    assert tier.exists_prefix(keys, 0, namespace=NS, max_age_s=30) == 2
    tier.close()


def test_s3_ages_come_from_last_modified(seaweed: tuple[ServerProcess, str]) -> None:
    tier = s3_backend(seaweed[1]).open(None, 2.0)
    keys = [bytes([i]) * 16 for i in range(1, 4)]
    assert tier.put(keys[0], 0, bytes(64), LAYOUT, namespace=NS)
    time.sleep(2.1)
    ages = tier.held_ages(keys, 0, namespace=NS)
    assert len(ages) == 1 and 1.0 <= ages[0] <= 4.0, ages
    tier.close()
