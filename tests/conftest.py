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

from training import TrainState


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


@pytest.fixture(params=["file", "memory"])
def remote(request, tmp_path) -> RemoteSpec:
    """Every in-process remote; S3, GCS and Drive join through their own fixtures."""
    return file_remote(tmp_path) if request.param == "file" else memory_remote()


@pytest.fixture
def state() -> TrainState:
    return TrainState()
