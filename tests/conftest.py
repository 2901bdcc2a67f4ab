"""Shared fixtures: a small model whose values say which step they came from, and remotes.

Remote fixtures follow fsspec's abstract-test style: each backend contributes a
:class:`RemoteSpec` (URL, storage_options, and an independent client to inspect
or damage what is stored), and the scenarios in ``test_remote_conformance.py``
run against every one of them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import posixpath
import subprocess
import sys
import time
import uuid
from typing import Any

import fsspec
import pytest

import ckptstore
from servers.fake_drive import FakeDriveServer, make_gdrive_fs, make_google_auth
from servers.gcs import GCSServer  # isort: split  (sets gcsfs's environment before gcsfs loads)
from servers.s3 import S3Server
from training import TrainState

BUCKET = "ckptstore-tests"


@dataclasses.dataclass
class RemoteSpec:
    """A remote for one test: where ckptstore writes, and a separate client to look at it."""

    url: str
    storage_options: dict[str, Any]
    fs: Any
    root: str

    def names(self) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(
                posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)
            )
        except FileNotFoundError:
            return []

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(name), data)

    def delete(self, name: str) -> None:
        self.fs.rm_file(self.path(name))

    def manifests(self) -> list[str]:
        return [n[: -len(".manifest.json")] for n in self.names() if n.endswith(".manifest.json")]


def file_remote(tmp_path) -> RemoteSpec:
    root = str(tmp_path / "remote")
    return RemoteSpec(f"file://{root}", {}, fsspec.filesystem("file"), root)


def memory_remote() -> RemoteSpec:
    root = f"/ckptstore-tests/{uuid.uuid4().hex}"
    return RemoteSpec(f"memory://{root}", {}, fsspec.filesystem("memory"), root)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    server = GCSServer().start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


def s3_remote(server, endpoint_url: str | None = None) -> RemoteSpec:
    import s3fs

    options = server.storage_options(endpoint_url)
    root = f"{BUCKET}/{uuid.uuid4().hex}"
    inspector = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    return RemoteSpec(f"s3://{root}", options, inspector, root)


def gcs_remote(server, endpoint_url: str | None = None) -> RemoteSpec:
    import gcsfs

    options = server.storage_options(endpoint_url)
    root = f"{BUCKET}/{uuid.uuid4().hex}"
    inspector = gcsfs.GCSFileSystem(skip_instance_cache=True, **server.storage_options())
    return RemoteSpec(f"gs://{root}", options, inspector, root)


def open_manager(state: TrainState, spec: RemoteSpec, staging, **kwargs: Any):
    """A ckptstore manager on ``spec``'s remote, staging in ``staging`` (keeps 2 unless told)."""
    kwargs.setdefault("max_to_keep", 2)
    return ckptstore.CheckpointManager(
        state.checkpoint,
        spec.url,
        staging_dir=str(staging),
        storage_options=spec.storage_options,
        **kwargs,
    )


class DriveRemoteSpec(RemoteSpec):
    """Drive keeps several files under one title: the inspector replaces and deletes by title."""

    def _ids(self, name: str) -> list[str]:
        parent = self.fs._get_item_id(self.root)
        query = f"'{parent}' in parents and trashed=false and title='{name}'"
        return [i["id"] for i in self.fs._gdrive_list(query) if i["title"] == name]

    def read(self, name: str) -> bytes:
        # pydrive2's stream slices its leftover on every small read (quadratic in the
        # file size): take whole chunks instead.
        with self.fs.open(self.path(name), "rb") as f:
            return b"".join(iter(lambda: f.read1(-1), b""))

    def write(self, name: str, data: bytes) -> None:
        self.delete(name)
        self.fs.pipe_file(self.path(name), data)

    def delete(self, name: str) -> None:
        for item_id in self._ids(name):
            self.fs._gdrive_delete_file(item_id)


@pytest.fixture(scope="session")
def drive_server():
    with FakeDriveServer() as server:
        yield server


def gdrive_remote(server, url: str | None = None, **options: Any) -> RemoteSpec:
    """A fresh folder under My Drive; ckptstore and the inspector each have their own client."""
    root = f"root/ckptstore-tests/{uuid.uuid4().hex}"
    auth = make_google_auth(server if url is None else _At(url, server.access_token))
    return DriveRemoteSpec(
        f"gdrive://{root}", {"google_auth": auth, **options}, make_gdrive_fs(server), root
    )


@dataclasses.dataclass
class _At:
    """Where a GoogleAuth sends its requests (the fake server, or a proxy in front of it)."""

    url: str
    access_token: str | None


@pytest.fixture(params=["file", "memory", "s3", "gcs", "gdrive"])
def remote(request, tmp_path) -> RemoteSpec:
    """Every remote: each scenario of the conformance suite runs against each one."""
    if request.param == "s3":
        return s3_remote(request.getfixturevalue("s3_server"))
    if request.param == "gcs":
        return gcs_remote(request.getfixturevalue("gcs_server"))
    if request.param == "gdrive":
        return gdrive_remote(request.getfixturevalue("drive_server"))
    return file_remote(tmp_path) if request.param == "file" else memory_remote()


@pytest.fixture
def state() -> TrainState:
    return TrainState()


def dead_writers_lease(in_flight: tuple[str, ...]) -> bytes:
    """The lease a writer on this machine left when it was killed mid-upload."""
    from ckptstore.ownership import Holder, machine_id

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    now = time.time()
    return Holder(
        writer="killed-writer",
        host="this-machine",
        pid=int(gone.stdout),
        since=now - 60,
        last_seen=now,
        lease_seconds=60,
        machine=machine_id(),
        process_start="1",
        in_flight=in_flight,
    ).to_json()
