"""Storage faults for tests: a local filesystem that misbehaves on request.

This injects faults into the *storage* (what fsspec's ``file`` protocol does),
the way the HTTP fault proxy does for S3 and GCS. ckptstore's own code runs
unchanged: it resolves ``file://`` to this class through fsspec's registry.

Faults are configured on the module-level :data:`FAULTS`, because fsspec caches
filesystem instances and ckptstore creates its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclasses.dataclass
class Faults:
    #: put_file waits for this event before copying (makes "upload still running" deterministic)
    gate: threading.Event | None = None
    #: put_file of a path waits for the event this returns for it (None: no wait)
    hold: Callable[[str], threading.Event | None] | None = None
    #: rm_file of a path waits for the event this returns for it (a retirement held mid-way)
    hold_rm: Callable[[str], threading.Event | None] | None = None
    #: seconds each put_file sleeps before copying (a slow link)
    put_delay: float = 0.0
    #: the next N put_file calls raise ConnectionError (transient)
    transient_put_failures: int = 0
    #: every write raises PermissionError (a remote that refuses writes)
    refuse_writes: bool = False
    #: SIGKILL this process when the predicate is true for (operation, path)
    kill_when: Callable[[str, str], bool] | None = None
    #: put_file copies only half of the file before the kill (mid-upload)
    kill_mid_put: Callable[[str], bool] | None = None
    #: a file opened "wb" at such a path gets half of its first write, then the kill
    kill_mid_write: Callable[[str], bool] | None = None
    #: the operation (op, path) raises PermissionError instead of running (op as for kill_when)
    fail_when: Callable[[str, str], bool] | None = None
    #: get_file (a download into local staging) writes half of the file, then the local
    #: disk is full: OSError(ENOSPC), as the kernel answers a write on a full disk
    local_disk_full: bool = False
    puts: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def reset(self) -> None:
        fresh = Faults()
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(fresh, field.name))


FAULTS = Faults()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultyLocalFileSystem(LocalFileSystem):
    """``LocalFileSystem`` with :data:`FAULTS` applied to writes and deletes."""

    def _refuse(self, op: str, path: str) -> None:
        if FAULTS.fail_when is not None and FAULTS.fail_when(op, path):
            raise PermissionError(13, f"injected: the remote refuses {op}", path)

    def _check(self, op: str, path: str) -> None:
        self._refuse(op, path)
        if FAULTS.kill_when is not None and FAULTS.kill_when(op, path):
            _die()

    def put_file(self, lpath, rpath, callback=None, **kwargs):
        rpath = self._strip_protocol(rpath)
        with FAULTS.lock:
            FAULTS.puts.append(os.path.basename(rpath))
            if FAULTS.transient_put_failures > 0:
                FAULTS.transient_put_failures -= 1
                raise ConnectionError(f"injected transient failure writing {rpath}")
        if FAULTS.refuse_writes:
            raise PermissionError(13, "injected: the remote refuses writes", rpath)
        if FAULTS.gate is not None:
            FAULTS.gate.wait()
        held = FAULTS.hold(rpath) if FAULTS.hold is not None else None
        if held is not None:
            held.wait()
        if FAULTS.put_delay:
            time.sleep(FAULTS.put_delay)
        self._check("put", rpath)
        if FAULTS.kill_mid_put is not None and FAULTS.kill_mid_put(rpath):
            with open(lpath, "rb") as src, open(rpath, "wb") as dst:
                dst.write(src.read(os.path.getsize(lpath) // 2))
                dst.flush()
                os.fsync(dst.fileno())
            _die()
        return super().put_file(lpath, rpath, callback=callback, **kwargs)

    def get_file(self, rpath, lpath, callback=None, **kwargs):
        if FAULTS.local_disk_full:
            rpath = self._strip_protocol(rpath)
            with open(rpath, "rb") as src, open(lpath, "wb") as dst:
                dst.write(src.read(os.path.getsize(rpath) // 2))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), lpath)
        # LocalFileSystem downloads with cp_file: a read of the remote, not a "cp" onto it.
        return LocalFileSystem.cp_file(self, rpath, lpath, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        self._check("open-" + mode, path)
        f = super().open(path, mode, **kwargs)
        if mode == "wb" and FAULTS.kill_mid_write is not None and FAULTS.kill_mid_write(path):
            return _DiesMidWrite(f)
        return f

    def mv(self, path1, path2, *args, **kwargs):
        # "mv" names the destination: the rename that would publish a file there.
        self._check("mv", self._strip_protocol(path2))
        return super().mv(path1, path2, *args, **kwargs)

    def cp_file(self, path1, path2, **kwargs):
        # "cp" names the destination, as "mv" does.
        self._check("cp", self._strip_protocol(path2))
        return super().cp_file(path1, path2, **kwargs)

    def rm_file(self, path):
        path = self._strip_protocol(path)
        if FAULTS.refuse_writes:
            raise PermissionError(13, "injected: the remote refuses deletes", path)
        self._refuse("rm", path)
        held = FAULTS.hold_rm(path) if FAULTS.hold_rm is not None else None
        if held is not None:
            held.wait()
        result = super().rm_file(path)
        self._check("rm", path)
        return result


class _DiesMidWrite:
    """A file being written that reaches the disk half-way, then the process dies."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        self._f.write(bytes(data)[: len(data) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())
        _die()
        return len(data)  # never reached

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextlib.contextmanager
def faulty_file_protocol() -> Iterator[Faults]:
    """Route ``file://`` to :class:`FaultyLocalFileSystem` for the duration."""
    original = fsspec.get_filesystem_class("file")
    fsspec.register_implementation("file", FaultyLocalFileSystem, clobber=True)
    FAULTS.reset()
    try:
        yield FAULTS
    finally:
        if FAULTS.gate is not None:
            FAULTS.gate.set()
        FAULTS.reset()
        fsspec.register_implementation("file", original, clobber=True)
        FaultyLocalFileSystem.clear_instance_cache()
