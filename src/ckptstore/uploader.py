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
failed checkpoint's staged files stay for the next manager to upload. That holds
for the upkeep too: a retirement, state-file write or orphan sweep that failed
is raised at ``sync()`` and tried again at the next one.

Only the run's writer has an uploader, and every commit, deletion and
state-file write first proves the writer still holds the run (a conditional
write of its lease, :meth:`ckptstore.ownership.Lease.renew`). A writer that
lost the run stops all remote work and ``sync()`` raises :class:`OwnershipLost`.

Back-pressure: at most ``max_pending`` checkpoints wait behind the one in
flight. When a save would exceed that, :attr:`WhenBehind.SKIP` drops the oldest
waiting one (it is superseded: the newest always goes next, and staging stays
bounded), while :attr:`WhenBehind.BLOCK` makes ``save()`` wait for room.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptstore import artifact, progress, staging
from ckptstore import manifest as mf
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.errors import OwnershipError, UploadError
from ckptstore.manifest import Manifest
from ckptstore.ownership import LEASE_NAME
from ckptstore.redaction import Redactor
from ckptstore.remote import STATE_FILE, Remote
from ckptstore.retry import RetryPolicy
from ckptstore.status import Status, one_line

log = logging.getLogger("ckptstore")


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
        lease: Any = None,
        takeover: bool = False,
    ):
        self.remote = remote
        #: the run's writer lease (ckptstore.ownership.Lease); None only in unit tests
        self._lease = lease
        self._takeover = takeover
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
        self._in_flight_over = False  # its upload ended (committed or failed); upkeep goes on
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
        self._retries = 0
        #: every byte handed to the network (UploadStatus.bytes_sent) and the recent rate
        self._meter = progress.RateMeter()
        self._transfer: progress.Transfer | None = None  # the upload in flight, once described
        self._sizes: dict[str, int] = {}  # queued or in flight -> bytes staged at submit
        # What status() reports beyond UploadStatus: the newest commit (inherited ones
        # by their manifest's time) and the most recent failure, kept after successes.
        newest = max(committed.values(), key=lambda m: m.timestamp, default=None)
        self._last_commit: tuple[str, float] | None = (
            (newest.checkpoint, newest.timestamp) if newest is not None else None
        )
        self._last_error: tuple[str, float] | None = None
        self._lost_noted = False  # the loss of the run is in _last_error already
        self._stop = threading.Event()
        self._abort = threading.Event()  # set by a close that timed out: cut backoffs short
        self._closed = False
        self._lost: OwnershipError | None = None  # the run was taken over: do no remote work
        self._orphans_due = True  # a new writer collects its predecessor's leftovers once
        self._delete_all_due = False  # delete_all(): retire everything committed, next round
        #: upkeep that failed ("write the state file", ...) -> error, raised by sync()
        self._upkeep_failures: dict[str, BaseException] = {}
        self._upkeep_unreported: dict[str, BaseException] = {}
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
        # Outside the lock: a few stat() calls, for status()'s bytes_left.
        size = _staged_size(self.staging_dir, request.checkpoint) if request is not None else 0
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
                self._sizes[request.checkpoint] = size
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
            self._forget_sizes()
            self._dirty = True
            self._cond.notify_all()
        # A checkpoint dropped from the queue is nobody's any more (the worker
        # only touches what is in flight or queued), so its staged files go now:
        # staging stays bounded even while the worker is stuck on a slow upload.
        for name in dropped + [n for n in retired if n in skipped_now]:
            staging.delete_checkpoint_files(os.path.join(self.staging_dir, name))
        return dropped

    def delete_all(self, staged: list[str]) -> None:
        """Drop every waiting upload and have the worker delete everything committed.

        The upload in flight finishes first (the worker does one thing at a time);
        then every committed checkpoint is retired as retention retires one (lease
        renewed, manifest first, oldest checkpoint first), TensorFlow's state file
        is deleted, and the staged copies of ``staged`` (the manager's checkpoints)
        and of failed uploads go, so no later manager on this staging directory
        uploads them again. :meth:`wait` then :meth:`raise_failures` say how it went.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("This CheckpointManager is closed; create a new one.")
            dropped = [r.checkpoint for r in self._pending]
            self._pending.clear()
            self._skipped.extend(dropped)
            self._tidy.update(staged)
            self._delete_all_due = True
            self._forget_sizes()
            self._dirty = True
            self._cond.notify_all()
        # Nobody's any more (as in submit()): the worker only touches what is queued or in flight.
        for name in dropped:
            staging.delete_checkpoint_files(os.path.join(self.staging_dir, name))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued upload is committed or failed and upkeep is done.

        Upkeep that failed before (a state file, a retirement) is tried once more.
        Returns ``False`` if ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._upkeep_failures and self._lost is None:
                self._dirty = True  # try the failed upkeep again before reporting it
                self._cond.notify_all()
            while (self._pending or self._busy or self._dirty) and self._thread.is_alive():
                if self._lost is not None and not self._busy:
                    break
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)
        return True

    def describe_pending(self) -> str:
        """``ckpt-7 (uploading), ckpt-8 (queued)``: what a timed-out wait still had to do."""
        with self._cond:
            parts = [f"{self._in_flight} (uploading)"] if self._in_flight else []
            parts += [f"{r.checkpoint} (queued)" for r in self._pending]
            if not parts and (self._busy or self._dirty):
                parts.append("retiring old checkpoints and writing the state file")
        return ", ".join(parts) or "nothing"

    def raise_failures(self) -> None:
        """Raise what went wrong since the last call.

        :class:`OwnershipLost` if another process took the run (every call, from
        then on); else :class:`UploadError` for uploads and upkeep that failed.
        """
        with self._cond:
            lost = self._lost
            failures, self._unreported = self._unreported, {}
            upkeep, self._upkeep_unreported = self._upkeep_unreported, {}
        if lost is not None:
            raise lost
        if failures or upkeep:
            lines = "; ".join(
                f"{name}: {self._redactor.describe(exc)}" for name, exc in failures.items()
            )
            chores = "; ".join(
                f"could not {what}: {self._redactor.describe(exc)}" for what, exc in upkeep.items()
            )
            text = []
            if failures:
                text.append(
                    f"{len(failures)} checkpoint(s) were not committed to {self.remote.url}: "
                    f"{lines}. Committed checkpoints are untouched; the failed ones stay staged "
                    f"in {self.staging_dir} and a new manager on that staging directory uploads "
                    "them."
                )
            if upkeep:
                text.append(
                    f"Upkeep of {self.remote.url} failed ({chores}). Every committed checkpoint "
                    "is still restorable; the next sync() tries again."
                )
            raise UploadError(" ".join(text), {**failures, **upkeep})

    def status(self) -> UploadStatus:
        with self._cond:
            return UploadStatus(
                committed=tuple(self._committed),
                in_flight=self._in_flight,
                pending=tuple(r.checkpoint for r in self._pending),
                failed=dict(self._failed),
                skipped=tuple(self._skipped),
                bytes_uploaded=self._bytes_uploaded,
                bytes_sent=self._meter.total,
                retries=self._retries,
            )

    def summary(self, url: str, role: str) -> Status:
        """The :class:`~ckptstore.status.Status` of this worker (``manager.status()``)."""
        # Before taking the lock: the manager holds its own lock while it calls submit().
        managed = {name for name, _ in self._snapshot().managed}
        with self._cond:
            in_flight = None if self._in_flight_over else self._in_flight
            queued = [r.checkpoint for r in self._pending]
            left = sum(self._sizes.get(n, 0) for n in queued)
            if in_flight is not None:
                transfer = self._transfer
                left += transfer.left if transfer is not None else self._sizes.get(in_flight, 0)
            lost = self._lost or (self._lease.lost if self._lease is not None else None)
            if lost is not None and self._lost is None and not self._lost_noted:
                # The lease's heartbeat found out first; the worker learns at its next step.
                self._note_error("lost the run", lost)
                self._lost_noted = True
            error = self._last_error
            return Status(
                url=url,
                role=role,
                pending=((in_flight,) if in_flight else ()) + tuple(queued),
                in_flight=in_flight,
                bytes_left=left,
                rate=self._meter.rate() if in_flight is not None else None,
                committed=len(self._committed),
                last_commit=self._last_commit[0] if self._last_commit else None,
                last_commit_time=self._last_commit[1] if self._last_commit else None,
                # A failed upload counts while its checkpoint is still the manager's (staged,
                # for the next manager to upload); once retention drops it, it is history.
                failed=tuple(n for n in self._failed if n in managed and n not in self._committed),
                last_error=error[0] if error else None,
                last_error_time=error[1] if error else None,
            )

    def _forget_sizes(self) -> None:
        """Drop the sizes of checkpoints neither queued nor in flight (caller holds the lock)."""
        keep = {r.checkpoint for r in self._pending} | {self._in_flight}
        self._sizes = {n: size for n, size in self._sizes.items() if n in keep}

    def _note_error(self, what: str, exc: BaseException) -> None:
        """Keep the most recent failure for status() (caller holds ``self._cond``)."""
        self._last_error = (one_line(f"{what}: {self._redactor.describe(exc)}"), time.time())

    def committed(self) -> dict[str, Manifest]:
        with self._cond:
            return dict(self._committed)

    def close(self, wait: bool = True) -> None:
        """Stop the worker; without ``wait``, cut its retries short and give it 5 s."""
        if wait:
            self.wait()
        else:
            self._abort.set()
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(timeout=None if wait else 5.0)

    @property
    def lost(self) -> OwnershipError | None:
        return self._lost

    # --- the worker ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._dirty or self._stop.is_set()):
                    self._cond.wait()
                if (self._stop.is_set() and not self._pending) or self._abort.is_set():
                    return
                if self._lost is not None:
                    # The run is someone else's now: nothing more goes to the remote.
                    # Queued checkpoints stay staged; sync() raises OwnershipLost.
                    self._pending.clear()
                    self._dirty = False
                    self._cond.notify_all()
                    continue
                request = self._pending.popleft() if self._pending else None
                self._in_flight = request.checkpoint if request else None
                self._in_flight_over = False
                self._dirty = False
                self._busy = True
            if request is not None:
                self._upload(request)
                with self._cond:  # committed or failed: upkeep follows, no longer "uploading"
                    self._in_flight_over = True
            if self._orphans_due:
                self._guarded("collect orphans", self._collect_orphans)
            if self._delete_all_due:  # cleared once done: a failure is tried again at sync()
                self._guarded("delete the checkpoints", self._delete_all)
            self._guarded("write the state file", self._write_state)
            self._guarded("retire old checkpoints", self._retire)
            self._guarded("tidy the staging directory", self._tidy_staging)
            with self._cond:
                if request is not None:
                    self._sizes.pop(request.checkpoint, None)
                self._in_flight = None
                self._busy = False
                self._cond.notify_all()

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        """Run one upkeep step; keep its failure for sync() instead of raising here."""
        try:
            step()
        except OwnershipError as exc:
            self._lose(exc)
        except Exception as exc:  # background work must never die silently
            with self._cond:
                self._upkeep_failures[what] = exc
                self._upkeep_unreported[what] = exc
                self._note_error(what, exc)
            log.warning(
                "ckptstore could not %s on %s (sync() will raise, and try again): %s",
                what,
                self.remote.url,
                self._redactor.describe(exc),
            )
        else:
            with self._cond:
                self._upkeep_failures.pop(what, None)

    def _lose(self, exc: OwnershipError) -> None:
        with self._cond:
            if self._lost is None:
                log.error("ckptstore: %s", exc)
                if not self._lost_noted:
                    # A close() that timed out stops the worker the same way: say which.
                    what = "stopped by close()" if self._abort.is_set() else "lost the run"
                    self._note_error(what, exc)
                    self._lost_noted = True
            self._lost = exc
            self._cond.notify_all()

    def _ensure_held(self, fresh_within: float = 0.0) -> None:
        """Before any commit, deletion or state-file write: the run must still be ours.

        ``fresh_within``: skip the renewal when the lease was written that many
        seconds ago or less (a state-file write right after the commit's renewal).
        Commits and deletions always renew.
        """
        if self._abort.is_set():
            raise OwnershipError(
                f"This manager was closed before its upload to {self.remote.url} finished; "
                "nothing more is committed (the checkpoint stays staged)."
            )
        if self._lease is None:
            return
        if self._lease.lost is None and not self._lease.held:
            # The manager could not reach the remote to take the run at save():
            # take it now, before the first byte goes up (OwnershipError if taken).
            self._lease.acquire(force=self._takeover)
            return
        # A conditional write of the lease: one small request, and a takeover that
        # landed a moment ago is seen before this process acts.
        if fresh_within <= 0 or self._lease.renewed_ago() > fresh_within:
            self._lease.renew()

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
            stop=self._abort,
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
            # Not one byte goes up unless this process writes the run, and the lease
            # says which checkpoint is going up: if this process dies now, the next
            # writer knows these files are ckptstore's leftovers (and only these).
            self._call("take the writer lease", self._ensure_held)
            if self._lease is not None:
                self._call(
                    "record the upload in the writer lease",
                    lambda: self._lease.mark_in_flight(name),
                )
            if name in self._committed:
                # Re-saving a number that is committed: withdraw the old commit
                # first, so no reader ever pairs the old manifest with new data.
                self._ensure_held()
                self._call(f"withdraw {name}", lambda: self.remote.uncommit(name))
                with self._cond:
                    del self._committed[name]
                self._write_state()

            transfer = progress.Transfer(
                f"Uploading {name} to {self.remote.url}",
                manifest.total_bytes,
                bar=progress.tqdm_bar(name, manifest.total_bytes)
                if progress.bars_enabled()
                else None,
                meter=self._meter,
            )
            with self._cond:
                self._transfer = transfer

            def verified(entry: mf.FileEntry) -> None:
                transfer.file_done(entry.size)  # what a silent backend did not report
                with self._cond:
                    self._bytes_uploaded += entry.size

            try:
                artifact.upload_verified(
                    self.remote,
                    manifest,
                    self.staging_dir,
                    call=self._call,
                    concurrency=self._concurrency,
                    progress=transfer.file,
                    on_verified=verified,
                )
            except BaseException:
                transfer.finish(ok=False)
                raise
            transfer.finish()
            self._call("renew the writer lease", self._ensure_held)
            self._call(f"commit {name}", lambda: self.remote.commit(manifest))
            with self._cond:
                self._committed[name] = manifest
                self._last_commit = (name, time.time())
            if self._lease is not None:
                self._lease.mark_done(name)
            log.info("Committed %s to %s (%d bytes)", name, self.remote.url, manifest.total_bytes)
        except OwnershipError as exc:
            with self._cond:
                self._failed[name] = self._redactor.describe(exc)  # keeps it staged
            self._lose(exc)
        except Exception as exc:
            with self._cond:
                self._failed[name] = self._redactor.describe(exc)
                self._unreported[name] = exc
                self._note_error(f"upload {name}", exc)
            log.warning(
                "Upload of %s to %s failed; it stays staged and sync() will raise: %s",
                name,
                self.remote.url,
                self._redactor.describe(exc),
            )
        finally:
            with self._cond:
                self._transfer = None

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
            self._call("renew the writer lease", lambda: self._ensure_held(fresh_within=0.5))
            self._call("write the state file", lambda: self.remote.write_state_text(text))
            self._last_state_text = text

    def _retire(self) -> None:
        with self._cond:
            committed = dict(self._committed)
            retired = list(self._retired)
        # Any newer commit will do, retired or not: when saves outpace the link, each
        # checkpoint is retired before its own upload ends, and waiting for one that
        # retention still keeps would keep every one of them on the remote.
        newest_committed = max((m.timestamp for m in committed.values()), default=None)
        changed = False
        for name in retired:
            manifest = committed.get(name)
            if manifest is not None:
                # Delete only once something newer is committed: a retired
                # checkpoint may still be the newest the remote can restore.
                if newest_committed is None or newest_committed <= manifest.timestamp:
                    continue
                self._retire_one(manifest)
                changed = True
            with self._cond:
                self._committed.pop(name, None)
                self._retired.remove(name)
        if changed:
            self._write_state()

    def _retire_one(self, manifest: Manifest) -> None:
        """Delete one committed checkpoint from the remote: its manifest, then its data."""
        name = manifest.checkpoint
        # Checks only (closed? lease taken?): mark_in_flight renews right after.
        self._call("renew the writer lease", lambda: self._ensure_held(fresh_within=math.inf))
        if self._lease is not None:
            # Listed while its data outlives its manifest: if this process dies
            # mid-retirement, the next writer knows those files are leftovers.
            self._call(
                "record the retirement in the writer lease",
                lambda: self._lease.mark_in_flight(name),
            )
        artifact.retire(self.remote, manifest, call=self._call)
        if self._lease is not None:
            self._lease.mark_done(name)

    def _delete_all(self) -> None:
        """Retire every committed checkpoint, delete the state file, empty staging (delete_all).

        Oldest first: a process killed midway leaves the newest checkpoint committed
        and restorable, never an older one alone.
        """
        with self._cond:
            committed = sorted(self._committed.values(), key=lambda m: (m.timestamp, m.number or 0))
        for manifest in committed:
            self._retire_one(manifest)
            with self._cond:
                self._committed.pop(manifest.checkpoint, None)
        self._call("renew the writer lease", self._ensure_held)
        self._call("delete the state file", lambda: self.remote.delete_data([STATE_FILE]))
        self._last_state_text = None
        with self._cond:
            self._retired.clear()
            self._delete_all_due = False
            doomed = self._tidy | set(self._failed)
            if self._in_flight:
                doomed.add(self._in_flight)  # uploaded (and just retired) or failed
            doomed -= {r.checkpoint for r in self._pending}  # saved after delete_all()
            doomed &= set(staging.staged_names(self.staging_dir))  # the rest are gone already
            self._tidy -= doomed
        for name in doomed:
            staging.delete_checkpoint_files(os.path.join(self.staging_dir, name))

    def _tidy_staging(self) -> None:
        """Delete staged copies nobody needs: not managed, queued or in flight.

        A checkpoint whose upload failed stays staged while the manager still
        manages it (the next manager on this staging directory uploads it); once
        retention drops it, it goes like any other. So a remote that keeps failing
        never holds more than ``max_to_keep + max_pending + 1`` checkpoints here,
        the newest among them.
        """
        snap = self._snapshot()
        with self._cond:
            keep = {r.checkpoint for r in self._pending}
            if self._in_flight:
                keep.add(self._in_flight)
            keep |= {n for n, _ in snap.managed}
            doomed = self._tidy - keep
            self._tidy -= doomed
        for name in doomed:
            staging.delete_checkpoint_files(os.path.join(self.staging_dir, name))

    def _collect_orphans(self) -> None:
        """Delete remote data no manifest vouches for (left by a crash mid-upload).

        Only the run's writer gets here, and it holds the lease: whoever left the
        files is gone (released, expired, or dead on this machine) or fenced, so
        nothing it still uploads can be committed.
        """
        previous = self._lease.previous if self._lease is not None else None
        leftovers = set(previous.in_flight) if previous is not None else set()
        names = self.remote.list_names()
        with_manifest = set(self.remote.committed_names(names))
        with self._cond:
            keep = with_manifest | {r.checkpoint for r in self._pending}
        # Only what the previous writer's lease says it was uploading: a user's
        # "embeddings.index" or a copied-in "bert.data-*" is not ckptstore's to delete.
        orphans = [
            n
            for n in names
            if (c := mf.checkpoint_of_data_file(n)) is not None and c in leftovers and c not in keep
        ]
        # ckptstore's own temporary names (a write-then-rename cut short), never the
        # lease's: another process may be taking it over this very moment.
        temps = [n for n in names if TEMP_MARKER in n and not n.startswith(LEASE_NAME)]
        if orphans or temps:
            log.info(
                "Collecting %d orphaned file(s) on %s", len(orphans) + len(temps), self.remote.url
            )
            self._call("renew the writer lease", self._ensure_held)
            self._call("collect orphans", lambda: self.remote.delete_data(orphans + temps))
        self._orphans_due = False


def _staged_size(staging_dir: str, name: str) -> int:
    """Bytes of the files TensorFlow wrote for checkpoint ``name`` (0 if they are gone)."""
    total = 0
    try:
        files = mf.checkpoint_files(staging_dir, name)
    except OSError:
        return 0
    for file in files:
        with contextlib.suppress(OSError):  # removed meanwhile (skipped, retired)
            total += os.path.getsize(os.path.join(staging_dir, file))
    return total
