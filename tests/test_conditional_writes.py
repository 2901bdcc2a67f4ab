"""Conditional writes on every remote: what the writer's lease (ckptstore.ownership) stands on.

``Backend.read_versioned`` returns an object's bytes and a version token;
``Backend.write_if`` writes only if the object is still at that version (or,
with ``None``, does not exist) and raises ``PreconditionFailed`` otherwise.
The scenarios run against every remote through ckptstore's own backends and
the real clients; the last tests ask the S3 and GCS servers directly, so a
reader knows the local servers refuse what the real services refuse.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from ckptstore.backends import resolve
from ckptstore.backends.base import Backend, PreconditionFailed
from ckptstore.backends.gdrive import DriveBackend
from conftest import BUCKET

LEASE = "ckptstore.lease.json"
RACERS = 8


def open_backend(remote) -> tuple[Backend, str]:
    """A backend with its own client, as another process would have."""
    backend, root = resolve(remote.url, {**remote.storage_options, "skip_instance_cache": True})
    if isinstance(backend, DriveBackend):
        # The fake lists a file as soon as it stores it and stamps createdDate in
        # milliseconds, so a creator need not wait Drive's 2 s before looking for rivals.
        backend.settle_seconds = 0.05
    return backend, f"{root}/{LEASE}"


def race(remote, attempt) -> tuple[list[tuple[int, str]], list[int], list[BaseException]]:
    """Run ``attempt(backend, path, i)`` in RACERS threads at once, each with its own backend.

    Returns (winners as (i, token), losers, unexpected errors).
    """
    backends = [open_backend(remote) for _ in range(RACERS)]
    start = threading.Barrier(RACERS)
    winners: list[tuple[int, str]] = []
    losers: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        backend, path = backends[i]
        start.wait()
        try:
            winners.append((i, attempt(backend, path, i)))
        except PreconditionFailed:
            losers.append(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return winners, losers, errors


def record(who: str) -> bytes:
    """Lease-like content: never the same twice."""
    return json.dumps({"writer": who, "nonce": uuid.uuid4().hex}).encode()


# --- the contract, on every remote ----------------------------------------------------


def test_reading_a_missing_object_gives_none(remote):
    backend, path = open_backend(remote)
    assert backend.read_versioned(path) is None


def test_create_if_absent_succeeds_once(remote):
    backend, path = open_backend(remote)
    first = record("first")
    token = backend.write_if(path, first, None)
    assert backend.read_versioned(path) == (first, token)

    other, _ = open_backend(remote)
    with pytest.raises(PreconditionFailed):
        other.write_if(path, record("second"), None)
    assert backend.read_versioned(path) == (first, token)


def test_replace_with_the_current_token_returns_a_new_token(remote):
    backend, path = open_backend(remote)
    t1 = backend.write_if(path, record("v1"), None)
    v2 = record("v2")
    t2 = backend.write_if(path, v2, t1)
    assert t2 != t1
    assert backend.read_versioned(path) == (v2, t2)
    v3 = record("v3")
    t3 = backend.write_if(path, v3, t2)
    assert backend.read_versioned(path) == (v3, t3)


def test_replace_with_a_stale_token_fails_and_keeps_the_winners_bytes(remote):
    backend, path = open_backend(remote)
    t1 = backend.write_if(path, record("v1"), None)
    winner, winners_bytes = open_backend(remote)[0], record("winner")
    t2 = winner.write_if(path, winners_bytes, t1)

    with pytest.raises(PreconditionFailed):
        backend.write_if(path, record("late"), t1)
    assert backend.read_versioned(path) == (winners_bytes, t2)


def test_replace_of_a_removed_object_fails(remote):
    backend, path = open_backend(remote)
    token = backend.write_if(path, record("v1"), None)
    backend.remove(path)
    with pytest.raises(PreconditionFailed):
        backend.write_if(path, record("v2"), token)
    assert backend.read_versioned(path) is None


def test_a_repeated_write_that_already_landed_is_won(remote):
    # What a client's retry does when the first attempt's answer was lost.
    backend, path = open_backend(remote)
    v1 = record("v1")
    t1 = backend.write_if(path, v1, None)
    assert backend.write_if(path, v1, None) == t1
    v2 = record("v2")
    t2 = backend.write_if(path, v2, t1)
    assert backend.write_if(path, v2, t1) == t2
    assert backend.read_versioned(path) == (v2, t2)


def test_racing_creators_leave_exactly_one_winner(remote):
    # The run's folder does not exist yet: on Drive each racer creates a copy of it too.
    winners, losers, errors = race(
        remote, lambda backend, path, i: backend.write_if(path, f"writer {i}".encode(), None)
    )
    assert errors == []
    backend, path = open_backend(remote)
    stored, token = backend.read_versioned(path)
    if backend.conditional_writes in ("atomic", "settled"):
        assert len(winners) == 1 and len(losers) == RACERS - 1, (winners, losers)
        ((i, won),) = winners
        assert (stored, token) == (f"writer {i}".encode(), won)
        if isinstance(backend, DriveBackend):  # every loser deleted its file
            assert len(backend._items(path, fresh=True)) == 1
    else:  # check-then-write: several may "win"; one of them is stored
        assert winners
        assert stored in {f"writer {i}".encode() for i, _ in winners}


def test_racing_renewals_from_one_token_leave_exactly_one_winner(remote):
    backend, path = open_backend(remote)
    start = backend.write_if(path, record("holder"), None)
    winners, losers, errors = race(
        remote, lambda backend, path, i: backend.write_if(path, f"renewal {i}".encode(), start)
    )
    assert errors == []
    stored, token = backend.read_versioned(path)
    if backend.conditional_writes in ("atomic", "settled"):
        assert len(winners) == 1 and len(losers) == RACERS - 1, (winners, losers)
        ((i, won),) = winners
        assert (stored, token) == (f"renewal {i}".encode(), won)
    else:
        assert winners


def test_every_remote_says_what_it_guarantees(remote):
    backend, _ = open_backend(remote)
    expected = {"file": "atomic", "memory": "best-effort", "s3": "atomic", "gs": "atomic"}
    assert backend.conditional_writes == expected.get(remote.url.split("://")[0], "settled")


def test_a_local_write_waits_for_another_process_holding_the_lock(tmp_path):
    backend, root = resolve(str(tmp_path / "run"))
    path = f"{root}/{LEASE}"
    hold = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(1.0)\n"
    )
    backend.make_dirs(root)
    other = subprocess.Popen(
        [sys.executable, "-c", hold, f"{path}.lock"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "held"
        started = time.monotonic()
        backend.write_if(path, record("waited"), None)
        assert time.monotonic() - started > 0.5  # blocked until the other process let go
    finally:
        other.wait(timeout=10)
        other.stdout.close()


# --- the servers themselves honour the preconditions ----------------------------------


def test_s3_server_refuses_put_object_like_s3(s3_server):
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    key = f"preconditions/{uuid.uuid4().hex}"

    def refused(**kwargs: Any) -> tuple[int, str]:
        with pytest.raises(ClientError) as caught:
            s3.put_object(Bucket=BUCKET, Body=b"no", **kwargs)
        reply = caught.value.response
        return reply["ResponseMetadata"]["HTTPStatusCode"], reply["Error"]["Code"]

    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=b"one", IfNoneMatch="*")["ETag"]
    assert refused(Key=key, IfNoneMatch="*") == (412, "PreconditionFailed")
    newer = s3.put_object(Bucket=BUCKET, Key=key, Body=b"two", IfMatch=etag)["ETag"]
    assert refused(Key=key, IfMatch=etag) == (412, "PreconditionFailed")
    assert refused(Key=key + "-missing", IfMatch=newer) == (404, "NoSuchKey")
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"two"


def _gcs(method: str, url: str, body: bytes | None = None, **headers: str):
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_gcs_server_refuses_uploads_by_generation_like_gcs(gcs_server):
    key = f"preconditions/{uuid.uuid4().hex}"

    def upload(data: bytes, generation: int | str) -> tuple[int, Any]:
        body = (
            b'--b\r\nContent-Type: application/json\r\n\r\n{"name": "' + key.encode() + b'"}'
            b"\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b--"
        )
        status, _, reply = _gcs(
            "POST",
            f"{gcs_server.endpoint_url}/upload/storage/v1/b/{BUCKET}/o"
            f"?uploadType=multipart&ifGenerationMatch={generation}",
            body,
            **{"Content-Type": 'multipart/related; boundary="b"'},
        )
        return status, json.loads(reply)

    status, created = upload(b"one", 0)
    assert status == 200
    assert upload(b"no", 0)[0] == 412  # 0: only if no live object exists
    status, replaced = upload(b"two", created["generation"])
    assert status == 200 and replaced["generation"] != created["generation"]
    assert upload(b"no", created["generation"])[0] == 412  # a stale generation

    # A download names the generation of the bytes it carries.
    status, headers, data = _gcs(
        "GET",
        f"{gcs_server.endpoint_url}/download/storage/v1/b/{BUCKET}/o/"
        + urllib.request.quote(key, safe="")
        + "?alt=media",
    )
    assert (status, data) == (200, b"two")
    assert headers["x-goog-generation"] == replaced["generation"]
