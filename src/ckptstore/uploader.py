"""The background half of a save: describe, upload, verify, commit, retire.

One worker thread owns every remote write and every deletion of staged files,
so the data path runs in one direction with no locking between steps:

1. **describe**: hash the staged files (CRC32C, MD5 where the backend needs it),
2. **upload** each file through fsspec, files of a checkpoint in parallel,
3. **verify** each stored object against the manifest (service checksum, or read back),
4. **commit**: write the manifest, then TensorFlow's state file listing committed checkpoints,
5. **retire** checkpoints the manager dropped: manifest first, then data, but only
   once a newer checkpoint is committed, so the remote always stays restorable,
6. **tidy** staging: delete staged copies nobody needs any more.

Failures never raise in the training thread. They are logged, kept, and raised
by :meth:`Uploader.raise_failures` (called by ``sync()`` and ``close()``); the
failed checkpoint's staged files stay for the next manager to upload.

Back-pressure: at most ``max_pending`` checkpoints wait behind the one in
flight. When a save would exceed that, :attr:`WhenBehind.SKIP` drops the oldest
waiting one (it is superseded: the newest always goes next, and staging stays
bounded), while :attr:`WhenBehind.BLOCK` makes ``save()`` wait for room.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fsspec.callbacks import Callback

from ckptstore import manifest as mf
from ckptstore import staging
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.manifest import Manifest
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy

log = logging.getLogger("ckptstore")
T = TypeVar("T")


def run_in_threads(work: Callable[[T], None], items: list[T], limit: int) -> None:
    """Run ``work`` on every item with at most ``limit`` threads; re-raise the first error.

    Written by hand instead of using ``concurrent.futures``: that module refuses
    new work once interpreter shutdown has begun, which is exactly when the
    exit drain uploads a script's last checkpoint.
    """
    todo = list(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                item = todo.pop(0)
            try:
                work(item)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

    threads = [
        threading.Thread(target=worker, name="ckptstore-put", daemon=True)
        for _ in range(max(1, min(limit, len(items))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class WhenBehind(str, enum.Enum):
    """What ``save()`` does when uploads fall ``max_pending`` checkpoints behind."""

    SKIP = "skip"  # drop the oldest waiting upload; never blocks training
    BLOCK = "block"  # wait until an upload finishes; every checkpoint reaches the remote


@dataclasses.dataclass(frozen=True)
class UploadRequest:
    """One staged checkpoint to upload (data, not a closure, so it can be queued and logged)."""

    checkpoint: str  # prefix name, e.g. "ckpt-7"
    number: int | None
    step: int | None
    timestamp: float


@dataclasses.dataclass(frozen=True)
class BookSnapshot:
    """The manager's view the worker needs: managed names (oldest first) and the clock."""

    managed: tuple[tuple[str, float], ...]
    last_preserved_timestamp: float


@dataclasses.dataclass(frozen=True)
class UploadStatus:
    """A point-in-time account of the background work (``manager.upload_status()``)."""

    committed: tuple[str, ...]
    in_flight: str | None
    pending: tuple[str, ...]
    failed: dict[str, str]
    skipped: tuple[str, ...]
    #: bytes of files verified on the remote
    bytes_uploaded: int
    retries: int
    #: bytes handed to the network so far, retried attempts included (progress; grows
    #: during a file's upload, in parts where the backend uploads in parts)
    bytes_sent: int = 0


class _SentBytes(Callback):
    """fsspec progress callback adding what a backend reports sent to the uploader's count."""

    def __init__(self, uploader: Uploader):
        super().__init__()
        self._uploader = uploader

    def call(self, *args: Any, **kwargs: Any) -> None:
        return None

    def relative_update(self, inc: int = 1) -> None:
        with self._uploader._cond:
            self._uploader._bytes_sent += inc
        super().relative_update(inc)

    def absolute_update(self, value: int) -> None:
        if value < self.value:  # a retried attempt starts over: count it from here
            self.value = value
            return
        self.relative_update(value - self.value)


class Uploader:
    """Background worker for one remote. Thread-safe entry points: ``submit``, ``wait``."""

    def __init__(
        self,
        remote: Remote,
        staging_dir: str,
        *,
        snapshot: Callable[[], BookSnapshot],
        committed: dict[str, Manifest],
        redactor: Redactor,
        retry: RetryPolicy,
        max_pending: int,
        when_behind: WhenBehind,
        concurrency: int,
        extra_versions: dict[str, str],
    ):
        self.remote = remote
        self.staging_dir = staging_dir
        self._snapshot = snapshot
        self._committed = dict(committed)
        self._redactor = redactor
        self._retry = retry
        self._max_pending = max_pending
        self._when_behind = WhenBehind(when_behind)
        self._concurrency = concurrency
        self._extra_versions = extra_versions

        self._cond = threading.Condition()
        self._pending: collections.deque[UploadRequest] = collections.deque()
        self._in_flight: str | None = None
        self._busy = False  # the worker is between taking work and finishing it
        self._dirty = True  # reconcile (state file, retirement, tidy) is due
        self._retired: list[str] = []  # dropped by the manager, still on the remote
        self._failed: dict[str, str] = {}
        self._unreported: dict[str, BaseException] = {}
        self._skipped: list[str] = []
        self._tidy: set[str] = set()  # staged copies to delete once unneeded
        self._last_state_text: str | None = None
        self._prepared = False
        self._bytes_uploaded = 0
        self._bytes_sent = 0
        self._retries = 0
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ckptstore-uploader", daemon=True)
        self._thread.start()

    # --- called from the training side ---------------------------------------

    def wait_for_room(self) -> None:
        """With ``WhenBehind.BLOCK``, wait until another checkpoint may be queued."""
        if self._when_behind is not WhenBehind.BLOCK:
            return
        with self._cond:
            while len(self._pending) >= self._max_pending and not self._stop.is_set():
                self._cond.wait()

    def submit(self, request: UploadRequest | None, retired: list[str]) -> list[str]:
        """Queue an upload and record checkpoints the manager retired.

        Returns the checkpoints dropped as superseded (never to be uploaded); the
        manager forgets them.
        """
        dropped: list[str] = []
        with self._cond:
            if self._closed:
                raise RuntimeError("This CheckpointManager is closed; create a new one to save.")
            for name in retired:
                if name not in self._retired:
                    self._retired.append(name)
                self._tidy.add(name)
            retired_set = set(retired)
            skipped_now: set[str] = set()
            for queued in [r for r in self._pending if r.checkpoint in retired_set]:
                self._pending.remove(queued)
                self._skipped.append(queued.checkpoint)
                skipped_now.add(queued.checkpoint)
                log.info("Not uploading %s: retired before its upload started", queued.checkpoint)
            if request is not None:
                self._pending = collections.deque(
                    r for r in self._pending if r.checkpoint != request.checkpoint
                )
                self._pending.append(request)
                self._failed.pop(request.checkpoint, None)
                while len(self._pending) > self._max_pending:
                    old = self._pending.popleft()
                    dropped.append(old.checkpoint)
                    self._skipped.append(old.checkpoint)
                    self._tidy.add(old.checkpoint)
                    log.warning(
                        "Uploads are %d checkpoints behind: skipping %s so the newest goes next "
                        "(when_behind='block' waits instead)",
                        self._max_pending,
                        old.checkpoint,
                    )
            self._dirty = True
            self._cond.notify_all()
        # A checkpoint dropped from the queue is nobody's any more (the worker
        # only touches what is in flight or queued), so its staged files go now:
        # staging stays bounded even while the worker is stuck on a slow upload.
        for name in dropped + [n for n in retired if n in skipped_now]:
            staging.delete_checkpoint_files(os.path.join(self.staging_dir, name))
        return dropped

    def wait(self) -> None:
        """Block until every queued upload is committed or failed and retirement is done."""
        with self._cond:
            while (self._pending or self._busy or self._dirty) and self._thread.is_alive():
                self._cond.wait(timeout=1.0)

    def raise_failures(self) -> None:
        """Raise :class:`UploadError` for failures not reported yet."""
        from ckptstore.errors import UploadError

        with self._cond:
            failures, self._unreported = self._unreported, {}
        if failures:
            lines = "; ".join(
                f"{name}: {self._redactor.describe(exc)}" for name, exc in failures.items()
            )
            raise UploadError(
                f"{len(failures)} checkpoint(s) were not committed to {self.remote.url}: {lines}. "
                "Committed checkpoints are untouched; the failed ones stay staged in "
                f"{self.staging_dir} and a new manager on that staging directory uploads them.",
                failures,
            )

    def status(self) -> UploadStatus:
        with self._cond:
            return UploadStatus(
                committed=tuple(self._committed),
                in_flight=self._in_flight,
                pending=tuple(r.checkpoint for r in self._pending),
                failed=dict(self._failed),
                skipped=tuple(self._skipped),
                bytes_uploaded=self._bytes_uploaded,
                bytes_sent=self._bytes_sent,
                retries=self._retries,
            )

    def committed(self) -> dict[str, Manifest]:
        with self._cond:
            return dict(self._committed)

    def close(self, wait: bool = True) -> None:
        if wait:
            self.wait()
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(timeout=None if wait else 5.0)

    # --- the worker ------------------------------------------------------------

    def _run(self) -> None:
        self._guarded("collect orphans", self._collect_orphans)
        while True:
            with self._cond:
                while not (self._pending or self._dirty or self._stop.is_set()):
                    self._cond.wait()
                if self._stop.is_set() and not self._pending:
                    return
                request = self._pending.popleft() if self._pending else None
                self._in_flight = request.checkpoint if request else None
                self._dirty = False
                self._busy = True
            if request is not None:
                self._upload(request)
            self._guarded("retire old checkpoints", self._reconcile)
            with self._cond:
                self._in_flight = None
                self._busy = False
                self._cond.notify_all()

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # background work must never die silently
            log.warning(
                "ckptstore could not %s on %s: %s",
                what,
                self.remote.url,
                self._redactor.describe(exc),
            )

    def _call(self, what: str, operation: Callable[[], object]) -> object:
        attempts = 0

        def counted() -> object:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                with self._cond:
                    self._retries += 1
            return operation()

        return self._retry.call(
            counted,
            is_transient=self.remote.backend.is_transient,
            what=f"{what} ({self.remote.url})",
            scrub=self._redactor.scrub,
        )

    def _upload(self, request: UploadRequest) -> None:
        name = request.checkpoint
        try:
            manifest = mf.describe(
                self.staging_dir,
                name,
                number=request.number,
                step=request.step,
                timestamp=request.timestamp,
                with_md5=self.remote.backend.needs_md5,
                extra_versions=self._extra_versions,
            )
            if not self._prepared:
                self._call("create the remote directory", self.remote.prepare)
                self._prepared = True
            if name in self._committed:
                # Re-saving a number that is committed: withdraw the old commit
                # first, so no reader ever pairs the old manifest with new data.
                self._call(f"withdraw {name}", lambda: self.remote.uncommit(name))
                with self._cond:
                    del self._committed[name]
                self._write_state()

            def send(entry: mf.FileEntry) -> None:
                local = os.path.join(self.staging_dir, entry.name)
                progress = _SentBytes(self)
                self._call(
                    f"upload {entry.name}", lambda: self.remote.upload(local, entry, progress)
                )
                self._call(f"verify {entry.name}", lambda: self.remote.verify(entry))
                with self._cond:
                    self._bytes_uploaded += entry.size

            run_in_threads(send, list(manifest.files), self._concurrency)
            self._call(f"commit {name}", lambda: self.remote.commit(manifest))
            with self._cond:
                self._committed[name] = manifest
            log.info("Committed %s to %s (%d bytes)", name, self.remote.url, manifest.total_bytes)
        except Exception as exc:
            with self._cond:
                self._failed[name] = self._redactor.describe(exc)
                self._unreported[name] = exc
            log.warning(
                "Upload of %s to %s failed; it stays staged and sync() will raise: %s",
                name,
                self.remote.url,
                self._redactor.describe(exc),
            )

    def _write_state(self) -> None:
        snap = self._snapshot()
        with self._cond:
            committed = dict(self._committed)
            retired = list(self._retired)
        listed: dict[str, float] = {}
        for name in retired:
            if name in committed:
                listed[name] = committed[name].timestamp
        for name, ts in snap.managed:
            if name in committed:
                listed.pop(name, None)
                listed[name] = ts
        if not listed:
            return
        text = staging.state_text(
            list(listed), list(listed.values()), snap.last_preserved_timestamp
        )
        if text != self._last_state_text:
            self._call("write the state file", lambda: self.remote.write_state_text(text))
            self._last_state_text = text

    def _reconcile(self) -> None:
        self._write_state()
        with self._cond:
            committed = dict(self._committed)
            retired = list(self._retired)
        retired_set = set(retired)
        survivors = [m.timestamp for n, m in committed.items() if n not in retired_set]
        newest_survivor = max(survivors, default=None)
        changed = False
        for name in retired:
            manifest = committed.get(name)
            if manifest is not None:
                # Delete only once something newer is committed: a retired
                # checkpoint may still be the newest the remote can restore.
                if newest_survivor is None or newest_survivor <= manifest.timestamp:
                    continue
                self._call(f"retire {name}", lambda n=name: self.remote.uncommit(n))
                self._call(
                    f"delete {name}",
                    lambda m=manifest: self.remote.delete_data([f.name for f in m.files]),
                )
                changed = True
            with self._cond:
                self._committed.pop(name, None)
                self._retired.remove(name)
        if changed:
            self._write_state()
        self._tidy_staging()

    def _tidy_staging(self) -> None:
        snap = self._snapshot()
        with self._cond:
            keep = {r.checkpoint for r in self._pending} | set(self._failed)
            if self._in_flight:
                keep.add(self._in_flight)
            keep |= {n for n, _ in snap.managed}
            doomed = self._tidy - keep
            self._tidy -= doomed
        for name in doomed:
            staging.delete_checkpoint_files(os.path.join(self.staging_dir, name))

    def _collect_orphans(self) -> None:
        """Delete remote data no manifest vouches for (left by a crash mid-upload)."""
        names = self.remote.list_names()
        with_manifest = set(self.remote.committed_names(names))
        with self._cond:
            keep = with_manifest | {r.checkpoint for r in self._pending}
        orphans = [
            n for n in names if (c := mf.checkpoint_of_data_file(n)) is not None and c not in keep
        ]
        temps = [n for n in names if TEMP_MARKER in n]
        if orphans or temps:
            log.info(
                "Collecting %d orphaned file(s) on %s", len(orphans) + len(temps), self.remote.url
            )
            self._call("collect orphans", lambda: self.remote.delete_data(orphans + temps))
