"""Local and mounted filesystems (``file://``, a plain path with ``staging_dir=``, a cloud mount).

A local write is visible while it is in progress and a kill can leave it half
done, so small objects are written to a unique temporary name and renamed over
the target (``os.replace`` is atomic on POSIX). Data files are fsynced before
the manifest that vouches for them is written, so a power cut cannot leave a
committed manifest over data still in the page cache. No checksum is kept by a
local filesystem: verification reads back (the default).

On a cloud-synced FUSE mount (Colab's Drive, gcsfuse, ...; see
:mod:`ckptstore.mounts`) the kernel's page cache still holds the bytes that
were just written, so a plain read-back would only prove what the kernel
remembers. There the file's cached pages are dropped before the read-back, so
the bytes come from the mount's daemon.

Conditional writes (the writer's lease) hold ``flock`` on a sidecar
``<path>.lock`` around read, compare and replace, so they are atomic among the
processes of one machine. The lock file is created once and never deleted:
deleting it would let a process that opened the old file and one that creates a
new one hold "the" lock at the same time. What remains on shared mounts: on NFS,
``flock`` reaches other clients only through the NFS lock protocol (not with
``nolock`` or ``local_lock=flock``); on a cloud-synced FUSE mount the lock and
the rename are local to each machine and each daemon uploads its own copy later,
so two machines writing one lease there are not excluded at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator
from typing import Any

from ckptstore import mounts
from ckptstore.backends.base import READ_BACK, Backend, Check
from ckptstore.manifest import FileEntry

try:
    import fcntl
except ImportError:  # not POSIX: write_if falls back to the default (one process only)
    fcntl = None  # type: ignore[assignment]

TEMP_MARKER = ".ckptstore-tmp-"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cached_pages(path: str) -> None:
    """Evict ``path`` from the page cache, so the next read asks the filesystem.

    ``POSIX_FADV_DONTNEED`` drops only clean pages, so the file is fsynced
    first: on FUSE this also hands every written page to the daemon. Where the
    call does not exist (not Linux) or is refused, the read-back still runs,
    only possibly from the cache, as it does on any local remote.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(lock_path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing, never deleted).

    A ``flock`` belongs to the open file description, so two threads of one
    process exclude each other too, each with its own ``open``.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class LocalBackend(Backend):
    #: directory -> whether it is on a cloud-synced mount. Filled on first use,
    #: once per directory, because the mount table is the same for every file.
    _cloud_verdicts: dict[str, bool] | None = None
    conditional_writes = "atomic" if fcntl is not None else "best-effort"

    def write_if(self, path: str, data: bytes, expected: str | None) -> str:
        if fcntl is None:
            return super().write_if(path, data, expected)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # a key needs no directory
        with _flocked(f"{path}.lock"):
            return self._compare_and_write(path, data, expected)

    def write_atomic(self, path: str, data: bytes) -> None:
        # Through the filesystem object (not raw open/os.replace), so whatever the
        # fsspec class does, a fault-injecting one in tests included, sees the commit.
        tmp = f"{path}{TEMP_MARKER}{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.fs.mv(tmp, path)  # LocalFileSystem.mv is os.replace: atomic on POSIX
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync(os.path.dirname(path) or ".")

    def upload(
        self, local_path: str, remote_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        super().upload(local_path, remote_path, entry, callback)
        _fsync(remote_path)

    def _check(self, path: str, entry: FileEntry) -> Check:
        if self.on_cloud_mount(path):
            _drop_cached_pages(path)
        found = super()._check(path, entry)
        if found.method == READ_BACK:  # always: a filesystem keeps no checksum
            return dataclasses.replace(found, detail="a filesystem keeps no checksum")
        return found

    def on_cloud_mount(self, path: str) -> bool:
        """Whether ``path`` is on a mount that uploads to a cloud after the write."""
        directory = os.path.dirname(path)
        if self._cloud_verdicts is None:
            self._cloud_verdicts = {}
        verdict = self._cloud_verdicts.get(directory)
        if verdict is None:
            # Several upload threads may compute this at once; they agree.
            verdict = mounts.cloud_synced_mount(directory) is not None
            self._cloud_verdicts[directory] = verdict
        return verdict
