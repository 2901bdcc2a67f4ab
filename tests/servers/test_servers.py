"""The test servers and the fault proxy, exercised with the real clients over HTTP.

Each test checks something a later test of ckptstore relies on: round trips
and service-side checksums (and their exact format) on both fake stores,
s3fs/gcsfs recovering from every fault mode, "server gone" failing fast, and
the bandwidth limit actually limiting.  Timeouts and retry settings are
small so the module runs in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import socket
import threading
import time

import crc32c
import pytest

# .gcs must be imported before gcsfs: it turns off gcsfs's experimental
# zonal-bucket class, which otherwise stalls ~60 s per bucket.
from .gcs import GCSServer  # isort: split

import gcsfs
import s3fs
from botocore.exceptions import EndpointConnectionError

from .faultproxy import FaultProxy
from .s3 import S3Server

MiB = 2**20

# Small timeouts and standard-mode retries: a stalled request costs ~1 s and
# every fault is retried by botocore itself (503, reset, read timeout).
FAST_S3_CONFIG = {
    "connect_timeout": 1,
    "read_timeout": 1,
    "retries": {"mode": "standard", "total_max_attempts": 10},
}


def crc32c_b64(data: bytes) -> str:
    """CRC32C as S3 and GCS report it: base64 of the 4 big-endian bytes."""
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs():
    with GCSServer() as server:
        yield server


@pytest.fixture
def s3_bucket(s3, request):
    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").strip("]-")[:50]
    s3.make_bucket(name)
    return name


def _s3fs(s3, endpoint_url=None, **config):
    return s3fs.S3FileSystem(
        **s3.storage_options(
            endpoint_url,
            skip_instance_cache=True,
            config_kwargs={**FAST_S3_CONFIG, **config},
        )
    )


# --------------------------------------------------------------------------- S3


def test_s3_round_trip_with_service_checksums(s3, s3_bucket, tmp_path):
    fs = _s3fs(s3)
    data = os.urandom(100_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    # A checksum computed here and handed over needs no awscrt; moto stores it
    # as given (it does not verify a client-supplied value).
    fs.put_file(
        str(src),
        f"{s3_bucket}/obj",
        ChecksumAlgorithm="CRC32C",
        ChecksumCRC32C=crc32c_b64(data),
    )
    fs.get_file(f"{s3_bucket}/obj", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data

    info = fs.info(f"{s3_bucket}/obj")
    assert info["size"] == len(data)
    assert info["ETag"] == '"' + hashlib.md5(data).hexdigest() + '"'  # single part: MD5 hex

    head = fs.call_s3("head_object", Bucket=s3_bucket, Key="obj", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == crc32c_b64(data)


def test_s3_crc32c_computed_by_botocore(s3, s3_bucket):
    # ChecksumAlgorithm alone makes botocore compute CRC32C: needs awscrt
    # (botocore[crt], in ckptstore's s3 extra); moto recomputes it too.
    fs = _s3fs(s3)
    data = os.urandom(50_000)
    fs.pipe(f"{s3_bucket}/obj", data, ChecksumAlgorithm="CRC32C")
    head = fs.call_s3("head_object", Bucket=s3_bucket, Key="obj", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == crc32c_b64(data)


def test_s3_multipart_composite_checksum(s3, s3_bucket, tmp_path):
    fs = _s3fs(s3)
    data = os.urandom(11 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    fs.put_file(str(src), f"{s3_bucket}/big", chunksize=5 * MiB, ChecksumAlgorithm="CRC32C")
    assert fs.cat(f"{s3_bucket}/big") == data

    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    md5_of_md5s = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert fs.info(f"{s3_bucket}/big")["ETag"] == f'"{md5_of_md5s}-{len(parts)}"'

    # Composite checksum: CRC32C over the parts' big-endian CRC32Cs.
    composite = crc32c_b64(b"".join(crc32c.crc32c(p).to_bytes(4, "big") for p in parts))
    attrs = fs.call_s3(
        "get_object_attributes", Bucket=s3_bucket, Key="big", ObjectAttributes=["Checksum"]
    )
    assert attrs["Checksum"] == {"ChecksumCRC32C": composite, "ChecksumType": "COMPOSITE"}
    got = fs.call_s3("get_object", Bucket=s3_bucket, Key="big", ChecksumMode="ENABLED")
    got["Body"].close()
    assert got["ChecksumCRC32C"] == f"{composite}-{len(parts)}"


# -------------------------------------------------------------------------- GCS


def test_gcs_round_trip_with_service_checksums(gcs, tmp_path):
    gcs.make_bucket("gcs-round-trip")
    gcs.make_bucket("gcs-round-trip")  # idempotent
    fs = gcsfs.GCSFileSystem(**gcs.storage_options(skip_instance_cache=True))
    assert type(fs).__name__ == "GCSFileSystem"  # not the experimental zonal class

    small = os.urandom(10_000)
    fs.pipe("gcs-round-trip/small", small)
    big = os.urandom(12 * MiB + 7)  # > block size: resumable upload in 3 chunks
    with fs.open("gcs-round-trip/big", "wb", block_size=5 * MiB) as f:
        f.write(big)
    src = tmp_path / "src.bin"
    src.write_bytes(big)
    fs.put_file(str(src), "gcs-round-trip/put")

    for name, data in (("small", small), ("big", big), ("put", big)):
        assert fs.cat(f"gcs-round-trip/{name}") == data
        info = fs.info(f"gcs-round-trip/{name}")
        assert info["size"] == len(data)
        assert info["crc32c"] == crc32c_b64(data)
        assert info["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()


# ----------------------------------------------------------------- fault proxy


def test_s3fs_survives_random_faults(s3, s3_bucket, tmp_path):
    with FaultProxy(s3.host, s3.port, failure_rate=0.2, seed=28, stall_seconds=5) as proxy:
        fs = _s3fs(s3, proxy.endpoint_url)
        blobs = {f"{s3_bucket}/small-{i}": os.urandom(20_000 + i) for i in range(10)}
        for path, data in blobs.items():
            fs.pipe(path, data)
        big = os.urandom(11 * MiB)
        (tmp_path / "big.bin").write_bytes(big)
        fs.put_file(str(tmp_path / "big.bin"), f"{s3_bucket}/big", chunksize=5 * MiB)
        for path, data in blobs.items():
            assert fs.cat(path) == data
            assert fs.info(path)["size"] == len(data)
        assert fs.cat(f"{s3_bucket}/big") == big

        faults = proxy.faults_injected
        assert sum(faults.values()) >= 3, faults
        assert sum(1 for n in faults.values() if n) >= 2, faults  # a mix of modes
        assert faults["truncate"] == 0  # not among the default modes
        # Every fault was answered by a retry that went through.
        assert proxy.requests == proxy.forwarded + proxy.total_faults
        assert proxy.requests > 3 * len(blobs)


@pytest.mark.parametrize("mode", ["5xx", "reset", "stall", "truncate"])
def test_s3fs_recovers_from_each_fault_mode(s3, s3_bucket, mode):
    with FaultProxy(s3.host, s3.port, stall_seconds=20) as proxy:
        fs = _s3fs(s3, proxy.endpoint_url)
        data = os.urandom(2 * MiB)
        fs.pipe(f"{s3_bucket}/obj", data)
        proxy.reset_counters()
        proxy.inject_next(mode)
        start = time.monotonic()
        assert fs.cat(f"{s3_bucket}/obj") == data
        # A stall costs one read_timeout (1 s), not the 20 s stall.
        assert time.monotonic() - start < 10
        assert proxy.faults_injected[mode] == 1
        assert proxy.requests >= 2


def test_server_gone_refuses_then_comes_back(s3, s3_bucket):
    with FaultProxy(s3.host, s3.port) as proxy:
        fs = _s3fs(s3, proxy.endpoint_url, retries={"mode": "standard", "total_max_attempts": 2})
        fs.pipe(f"{s3_bucket}/obj", b"payload")  # leaves a pooled keep-alive connection

        proxy.server_gone()
        assert proxy.is_gone
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        start = time.monotonic()
        with pytest.raises(EndpointConnectionError, match="Could not connect"):
            fs.cat(f"{s3_bucket}/obj")
        assert time.monotonic() - start < 10

        proxy.server_back()
        assert fs.cat(f"{s3_bucket}/obj") == b"payload"


def test_bandwidth_limit_throttles_both_directions(s3, s3_bucket):
    data = os.urandom(4 * MiB)
    with FaultProxy(s3.host, s3.port, bandwidth_bytes_per_s=2 * MiB) as proxy:
        fs = _s3fs(s3, proxy.endpoint_url, read_timeout=30)
        start = time.monotonic()
        fs.pipe(f"{s3_bucket}/obj", data)
        upload_s = time.monotonic() - start
        start = time.monotonic()
        assert fs.cat(f"{s3_bucket}/obj") == data
        download_s = time.monotonic() - start
    # 4 MiB at 2 MiB/s is ~2 s each way; unthrottled it is ~0.05 s.
    assert 1.0 < upload_s < 15, upload_s
    assert 1.0 < download_s < 15, download_s


def test_gcsfs_through_proxy_follows_rewritten_upload_url(gcs):
    gcs.make_bucket("gcs-proxied")
    with FaultProxy(gcs.host, gcs.port) as proxy:
        fs = gcsfs.GCSFileSystem(
            **gcs.storage_options(proxy.endpoint_url, skip_instance_cache=True)
        )
        big = os.urandom(11 * MiB)
        proxy.inject_next("5xx")  # gcsfs retries it (after a 1-2 s backoff)
        with fs.open("gcs-proxied/big", "wb", block_size=5 * MiB) as f:
            f.write(big)
        assert fs.cat("gcs-proxied/big") == big
        # The resumable session URL came back in Location pointing at the
        # upstream; the proxy rewrote it, so every chunk went through it.
        assert proxy.faults_injected["5xx"] == 1
        assert proxy.forwarded >= 4  # init + 3 chunks, at least
        assert fs.info("gcs-proxied/big")["crc32c"] == crc32c_b64(big)


def test_proxy_keep_alive_latency_and_raw_503(gcs):
    with FaultProxy(gcs.host, gcs.port, latency_s=0.2) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        try:
            start = time.monotonic()
            for _ in range(2):
                conn.request("GET", "/storage/v1/b")
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
            assert time.monotonic() - start >= 0.4  # 0.2 s added per request
            proxy.inject_next("5xx")
            conn.request("GET", "/storage/v1/b")
            resp = conn.getresponse()
            assert resp.status == 503
            assert b"ServiceUnavailable" in resp.read()
            conn.request("HEAD", "/storage/v1/b")  # same connection still usable
            assert conn.getresponse().status in (200, 404, 405)
        finally:
            conn.close()
        assert proxy.connections == 1
        assert proxy.requests == 4


def test_stop_ends_all_threads_even_mid_stall(gcs):
    proxy = FaultProxy(gcs.host, gcs.port, failure_rate=1.0, modes=["stall"], stall_seconds=60)
    proxy.start()
    clients = []
    for _ in range(3):
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        c.sendall(b"GET /storage/v1/b HTTP/1.1\r\nHost: x\r\n\r\n")
        clients.append(c)
    deadline = time.monotonic() + 5
    while proxy.faults_injected["stall"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.faults_injected["stall"] == 3
    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 3
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]
    for c in clients:
        # The stalled connections were cut (RST or EOF), not left hanging:
        # a hang would raise TimeoutError here after 5 s.
        try:
            got = c.recv(1)
        except ConnectionResetError:
            got = b""
        assert got == b""
        c.close()
