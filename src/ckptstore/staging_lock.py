"""Which process on this machine owns a staging directory.

The remote's lease (:mod:`ckptstore.ownership`) says which process writes a
run; this lock says which process may write and delete in a *staging
directory*. Two managers on one machine that open the same URL share the
default staging directory, and the second one (a reconnected notebook, an
evaluator) must not tidy, adopt or overwrite what the first one staged. The
kernel releases an ``flock`` when its process dies, however it dies, so a dead
owner never blocks its successor and a live one is never mistaken for dead.
"""

from __future__ import annotations

import contextlib
import os
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: no lock, every manager owns its staging directory
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".ckptstore.lock"


class StagingLock:
    """An exclusive, non-blocking ``flock`` on ``<staging_dir>/.ckptstore.lock``.

    Example::

        lock = StagingLock("/tmp/staging")
        if not lock.acquire():
            print("in use by pid", lock.holder_pid())
    """

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> bool:
        """Take the lock if no live process holds it; ``True`` when this process has it."""
        if self._file is not None:
            return True
        handle = open(self.path, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return True

    def holder_pid(self) -> int | None:
        """The pid that last took the lock (for messages), if it can be read."""
        try:
            with open(self.path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None
