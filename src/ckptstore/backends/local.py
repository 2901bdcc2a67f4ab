"""Local and mounted filesystems (``file://``, a path with ``staging_dir=``).

A local write is visible while it is in progress and a kill can leave it half
done, so small objects are written to a unique temporary name and renamed over
the target (``os.replace`` is atomic on POSIX). Data files are fsynced before
the manifest that vouches for them is written, so a power cut cannot leave a
committed manifest over data still in the page cache. No checksum is kept by a
local filesystem: verification reads back (the default).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from ckptstore.backends.base import Backend
from ckptstore.manifest import FileEntry

TEMP_MARKER = ".ckptstore-tmp-"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend(Backend):
    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}{TEMP_MARKER}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync(os.path.dirname(path) or ".")

    def upload(
        self, local_path: str, remote_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        super().upload(local_path, remote_path, entry, callback)
        _fsync(remote_path)
