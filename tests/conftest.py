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
import uuid
from typing import Any

import fsspec
import pytest

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


@pytest.fixture(params=["file", "memory", "s3", "gcs"])
def remote(request, tmp_path) -> RemoteSpec:
    """Every remote: each scenario of the conformance suite runs against each one."""
    if request.param == "s3":
        return s3_remote(request.getfixturevalue("s3_server"))
    if request.param == "gcs":
        return gcs_remote(request.getfixturevalue("gcs_server"))
    return file_remote(tmp_path) if request.param == "file" else memory_remote()


@pytest.fixture
def state() -> TrainState:
    return TrainState()
