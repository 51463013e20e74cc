"""The remote backends the tests run against, on real servers (tests/servers.py starts them):
Redis, Redis Cluster (3 masters), Valkey, Redis over TLS with an ACL user, and S3 (SeaweedFS) over
http and https. Each is a way to open the tier and a raw client for server-side checks and
tampering. A test module that calls ``make_backend`` imports the server fixtures of
tests/servers.py (``make_backend`` asks for them by name)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pytest
import redis
from botocore.exceptions import ClientError
from redis.cluster import RedisCluster

from kvtier.compression import KVCodec
from kvtier.crypto import Sealer
from kvtier.tiers.remote import RemoteTier, open_remote
from tests.servers import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, TLS_PASSWORD, TLS_USER, TLSFiles, free_ports, \
    port_of, s3_client


class Opener(Protocol):
    def __call__(self, ttl_s: int | None, timeout_s: float, *, sealer: Sealer | None = None,
                 codec: KVCodec | None = None) -> RemoteTier: ...


@dataclass
class Backend:
    """How a test reaches one server: open a tier, and a raw client to look at or tamper with values."""

    name: str
    open: Opener  # (ttl_s, timeout_s, sealer=None) -> tier
    open_unreachable: Callable[[float], RemoteTier]  # timeout_s -> tier aimed at a closed port
    raw_get: Callable[[str], bytes | None]
    raw_set: Callable[[str, bytes], None]
    write_marker: Callable[[str], object]  # changes whenever the server (re)writes the value
    remaining_ttl_s: Callable[[str], float | None]  # None: the store has no per-object TTL


def redis_backend(name: str, url: str, raw: redis.Redis | RedisCluster, unreachable_url: str,
                  tls: TLSFiles | None = None, username: str | None = None,
                  password: str | None = None) -> Backend:
    def open_tier(ttl_s: int | None, timeout_s: float, target: str = url, *, sealer: Sealer | None = None,
                  codec: KVCodec | None = None) -> RemoteTier:
        return open_remote(target, ttl_s=ttl_s, timeout_s=timeout_s, username=username, password=password,
                           sealer=sealer, codec=codec, **tls_options(tls))

    def remaining(name: str) -> float | None:
        return int(raw.pttl(name)) / 1000

    return Backend(name, open_tier, lambda timeout_s: open_tier(None, timeout_s, unreachable_url), raw.get,
                   lambda name, value: raw.set(name, value), lambda name: raw.pexpiretime(name), remaining)


def tls_options(tls: TLSFiles | None) -> dict[str, str | None]:
    """The CA and client certificate options of a TLS test server (none without TLS)."""
    if tls is None:
        return {}
    return {"tls_ca": tls.ca, "tls_cert": tls.client_cert, "tls_key": tls.client_key}


def s3_backend(endpoint: str, tls: TLSFiles | None = None) -> Backend:
    client = s3_client(endpoint, tls=tls)
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def open_tier(ttl_s: int | None, timeout_s: float, target: str = endpoint, *,
                  sealer: Sealer | None = None, codec: KVCodec | None = None) -> RemoteTier:
        return open_remote(f"s3://{S3_BUCKET}/{prefix}", ttl_s=ttl_s, timeout_s=timeout_s, s3_endpoint=target,
                           s3_region="us-east-1", access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, sealer=sealer,
                           codec=codec, **tls_options(tls))

    def raw_get(name: str) -> bytes | None:
        try:
            return client.get_object(Bucket=S3_BUCKET, Key=name)["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise

    def marker(name: str) -> object:
        head = client.head_object(Bucket=S3_BUCKET, Key=name)
        return head["ETag"], head["LastModified"]

    closed = f"{'https' if tls else 'http'}://127.0.0.1:{free_ports(1)[0]}"
    return Backend("s3" if tls is None else "s3-tls", open_tier, lambda timeout_s: open_tier(None, timeout_s, closed), raw_get,
                   lambda name, value: client.put_object(Bucket=S3_BUCKET, Key=name, Body=value), marker,
                   lambda name: None)


BACKENDS = ["redis", "redis-cluster", "valkey", "redis-tls", "s3", "s3-tls"]
NATIVE_TTL_BACKENDS = ["redis", "redis-cluster", "valkey", "redis-tls"]


def make_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    closed = free_ports(1)[0]
    if name in ("redis", "valkey"):
        port = port_of(request.getfixturevalue(f"{name}_server"))
        return redis_backend(name, f"redis://127.0.0.1:{port}", redis.Redis(port=port),
                             f"redis://127.0.0.1:{closed}")
    if name == "redis-cluster":
        ports = [port_of(node) for node in request.getfixturevalue("redis_cluster_nodes")]
        return redis_backend(name, "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports),
                             RedisCluster(host="127.0.0.1", port=ports[0]),
                             f"redis+cluster://127.0.0.1:{closed}")
    if name == "redis-tls":
        _, tls, tls_port = request.getfixturevalue("redis_tls_server")
        raw = redis.Redis(port=tls_port, ssl=True, ssl_ca_certs=tls.ca, ssl_certfile=tls.client_cert,
                          ssl_keyfile=tls.client_key, username=TLS_USER, password=TLS_PASSWORD)
        return redis_backend(name, f"rediss://127.0.0.1:{tls_port}", raw, f"rediss://127.0.0.1:{closed}",
                             tls=tls, username=TLS_USER, password=TLS_PASSWORD)
    if name == "s3-tls":
        _, endpoint, tls = request.getfixturevalue("seaweed_tls")
        return s3_backend(endpoint, tls)
    assert name == "s3"
    return s3_backend(request.getfixturevalue("seaweed")[1])
