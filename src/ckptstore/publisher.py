"""Background publishing of SavedModels and Keras files: upload, verify, commit.

``ckptstore.saved_model.save`` and ``ckptstore.keras`` write an artifact into a
local directory, hand it to :func:`submit` as a :class:`PublishJob`, and return
a :class:`PublishHandle` at once; one worker thread per process uploads jobs in
order through the steps all artifacts share (:mod:`ckptstore.artifact`). The
handle's :meth:`~PublishHandle.wait` blocks until the artifact is verified and
committed, and raises :class:`~ckptstore.UploadError` if it was not.

What a kill leaves, at any instant:

* Before the first byte goes up, a marker ``<name>.ckptstore-pending.json`` is
  written beside the manifest. It lists the files about to be uploaded, so a
  later save to the same place knows exactly which uncommitted objects are
  ckptstore's leftovers (and deletes only those), and a load can say that an
  upload was interrupted rather than that the URL holds something foreign.
* A Keras file saved again under its own name (``best.keras``) goes up under a
  side name first and is committed there, then copied over the old object and
  committed again: one intact, committed copy exists at every moment.
* A SavedModel exported again into the same directory is withdrawn (manifest
  deleted) before its files are replaced: for that moment the directory is
  "not committed", never half old and half new.

Jobs are drained at interpreter exit, as checkpoint uploads are.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptstore import artifact, exit_drain, progress
from ckptstore import manifest as mf
from ckptstore.errors import ManifestError, UploadError
from ckptstore.manifest import Manifest
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy
from ckptstore.status import WRITER, Status, one_line

log = logging.getLogger("ckptstore")

PENDING_SUFFIX = ".ckptstore-pending.json"
_PENDING_FORMAT = "ckptstore.pending"


def pending_name(name: str) -> str:
    """The marker of an upload in progress: ``best.keras.ckptstore-pending.json``."""
    return name + PENDING_SUFFIX


class PublishHandle:
    """A save whose upload runs in the background; :meth:`wait` for its commit.

    Example::

        handle = ckptstore.saved_model.save(model, "s3://bucket/exports/1")
        ...                      # training goes on while the export uploads
        handle.wait()            # verified and committed, or UploadError
    """

    def __init__(self, url: str, name: str, local_dir: str):
        #: the URL as the user gave it, credentials removed
        self.url = url
        self.name = name
        #: where the artifact was written locally before the upload
        self.local_dir = local_dir
        self._done = threading.Event()
        self._manifest: Manifest | None = None
        self._error: BaseException | None = None
        #: set when a newer save of the same file replaced this one before it went up
        self.superseded = False

    def __repr__(self) -> str:
        state = "committed" if self.committed else ("failed" if self._error else "pending")
        if self.superseded:
            state = "superseded"
        return f"PublishHandle({self.url!r}, {state})"

    @property
    def committed(self) -> bool:
        return self._manifest is not None

    @property
    def manifest(self) -> Manifest | None:
        """The committed manifest, once :meth:`done`."""
        return self._manifest

    def done(self) -> bool:
        """Whether the upload has finished: committed, failed or superseded."""
        return self._done.is_set()

    def exception(self) -> BaseException | None:
        return self._error

    def wait(self, timeout: float | None = None) -> Manifest | None:
        """Block until the artifact is verified and committed on the remote.

        Returns its manifest (``None`` if a newer save of the same file
        superseded it before it went up).

        Raises:
            UploadError: the upload, the verification or the commit failed;
                whatever was committed before is untouched.
            TimeoutError: ``timeout`` seconds passed first (the upload goes on).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"ckptstore: {self.url} is still uploading after {timeout} s; the upload "
                "goes on in the background. Call wait() again to wait for it."
            )
        if self._error is not None:
            raise self._error
        return self._manifest

    def _finish(
        self, manifest: Manifest | None, error: BaseException | None, superseded: bool = False
    ) -> None:
        self._manifest, self._error, self.superseded = manifest, error, superseded
        self._done.set()


class Account:
    """Where one target's uploads stand: an ``Exporter``'s or a ``ModelCheckpoint``'s.

    The publisher uploads the jobs of every target in one queue; each job may
    name the account of the object that made it, and the publisher keeps that
    account up to date (queued, uploading, committed, failed) for its
    ``status()``. Thread-safe.

    Example::

        account = Account("s3://bucket/serving/ranker")
        job = PublishJob(..., account=account, label="version 3")
        publisher.submit(job)
        print(account.status())   # ckptstore s3://bucket/serving/ranker: 1 pending (...)
    """

    def __init__(self, url: str):
        #: the target as shown (credentials removed)
        self.url = url
        self._lock = threading.Lock()
        self._waiting: dict[PublishHandle, tuple[str, int]] = {}  # queued or uploading, in order
        self._in_flight: PublishHandle | None = None
        self._transfer: progress.Transfer | None = None
        #: the bytes this target's uploads sent, and their recent rate
        self.meter = progress.RateMeter()
        self._committed = 0
        self._last_commit: tuple[str, float] | None = None
        self._failed: dict[str, None] = {}  # labels failed and not committed since, in order
        self._last_error: tuple[str, float] | None = None

    def queued(self, handle: PublishHandle, label: str, size: int) -> None:
        with self._lock:
            self._waiting[handle] = (label, size)
            self._failed.pop(label, None)  # saved again: it is pending now, not failed

    def dropped(self, handle: PublishHandle) -> None:
        """A newer save of the same file replaced this one before it went up."""
        with self._lock:
            self._waiting.pop(handle, None)

    def started(self, handle: PublishHandle, transfer: progress.Transfer | None = None) -> None:
        with self._lock:
            self._in_flight = handle
            self._transfer = transfer

    def finished(self, handle: PublishHandle, error: str | None) -> None:
        """The upload of ``handle`` is over: committed (``error`` None) or failed."""
        with self._lock:
            label, _ = self._waiting.pop(handle, (handle.name, 0))
            if self._in_flight is handle:
                self._in_flight, self._transfer = None, None
            if error is None:
                self._committed += 1
                self._last_commit = (label, time.time())
                self._failed.pop(label, None)
            else:
                self._failed[label] = None
                self._last_error = (one_line(f"upload {label}: {error}"), time.time())

    def error(self, text: str) -> None:
        """A failure after a commit (retiring old versions, ...): kept as the last error."""
        with self._lock:
            self._last_error = (one_line(text), time.time())

    def status(self, role: str = WRITER) -> Status:
        """The :class:`~ckptstore.status.Status` of this target's uploads."""
        with self._lock:
            pending = [label for label, _ in self._waiting.values()]
            left = 0
            in_flight = None
            for handle, (label, size) in self._waiting.items():
                if handle is self._in_flight:
                    in_flight = label
                    if self._transfer is not None:
                        size = self._transfer.left
                left += size
            if in_flight is not None:  # the one uploading first, as for checkpoints
                pending.remove(in_flight)
                pending.insert(0, in_flight)
            commit, error = self._last_commit, self._last_error
            return Status(
                url=self.url,
                role=role,
                pending=tuple(pending),
                in_flight=in_flight,
                bytes_left=left,
                rate=self.meter.rate() if in_flight is not None else None,
                committed=self._committed,
                last_commit=commit[0] if commit else None,
                last_commit_time=commit[1] if commit else None,
                failed=tuple(self._failed),
                last_error=error[0] if error else None,
                last_error_time=error[1] if error else None,
            )


@dataclasses.dataclass
class PublishJob:
    """One artifact written locally, to upload, verify and commit."""

    remote: Remote
    redactor: Redactor
    name: str  # the artifact's name under the remote root ("best.keras", "saved_model")
    kind: str  # ckptstore.manifest.KERAS or SAVED_MODEL
    local_dir: str  # where the files are
    files: list[str]  # relative POSIX paths under local_dir
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int | None = None
    number: int | None = None
    #: a newer job for the same URL replaces this one while it waits (never mid-upload)
    supersedable: bool = False
    #: delete ``local_dir`` once committed (a temporary export)
    remove_local: bool = True
    #: runs in the worker after the commit (retiring old versions, ...); failures are logged
    after_commit: Callable[[Manifest], None] | None = None
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    concurrency: int = 4
    #: the status() account of the object that made the job (an Exporter, a callback)
    account: Account | None = None
    #: what status() and the log call the job ("version 3"); its ``name`` by default
    label: str | None = None

    @property
    def shown(self) -> str:
        return self.label or self.name

    @property
    def key(self) -> str:
        return self.remote.path(self.name)


class Publisher:
    """One worker thread that publishes jobs in the order they were submitted."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[PublishJob, PublishHandle]] = collections.deque()
        self._busy: tuple[PublishJob, PublishHandle] | None = None
        self._thread = threading.Thread(target=self._run, name="ckptstore-publisher", daemon=True)
        self._thread.start()
        exit_drain.register(self._drain)

    def submit(self, job: PublishJob) -> PublishHandle:
        handle = PublishHandle(job.redactor.url, job.name, job.local_dir)
        size = _local_size(job) if job.account is not None else 0  # stat() outside the lock
        with self._cond:
            for queued in [q for q in self._queue if q[0].supersedable and q[0].key == job.key]:
                self._queue.remove(queued)
                log.info("Not uploading an older save of %s: a newer one replaces it", job.name)
                _remove_local(queued[0])
                queued[1]._finish(None, None, superseded=True)
                if queued[0].account is not None:
                    queued[0].account.dropped(queued[1])
            self._queue.append((job, handle))
            if job.account is not None:
                job.account.queued(handle, job.shown, size)
            self._cond.notify_all()
        return handle

    def pending(self) -> list[PublishHandle]:
        with self._cond:
            return [h for _, h in ([self._busy] if self._busy else []) + list(self._queue)]

    def wait_all(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                self._busy = self._queue.popleft()
            job, handle = self._busy
            account = job.account
            if account is not None:
                account.started(handle)
            try:
                manifest = publish(job, handle)
            except BaseException as exc:
                error = _as_upload_error(job, exc)
                log.warning("%s", error)
                if account is not None:
                    account.finished(handle, job.redactor.describe(exc))
                handle._finish(None, error)
            else:
                if account is not None:
                    account.finished(handle, None)
                handle._finish(manifest, None)
                _remove_local(job)
            with self._cond:
                self._busy = None
                self._cond.notify_all()

    def _drain(self) -> None:
        waiting = self.pending()
        if not waiting:
            return
        log.warning(
            "ckptstore: finishing the upload of %s before exit...",
            ", ".join(h.url for h in waiting),
        )
        self.wait_all()
        for handle in waiting:
            if handle.exception() is not None:
                message = f"ckptstore: {handle.url} NOT committed at exit: {handle.exception()}"
                log.error("%s", message)
                print(message, file=sys.stderr, flush=True)  # the last word, loudly


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def submit(job: PublishJob) -> PublishHandle:
    """Queue ``job`` on this process's publisher (started on first use)."""
    global _publisher
    with _publisher_lock:
        if _publisher is None:
            _publisher = Publisher()
        return _publisher.submit(job)


def wait_all(timeout: float | None = None) -> bool:
    """Wait until every submitted job is done; ``False`` if ``timeout`` passed first."""
    return _publisher.wait_all(timeout) if _publisher is not None else True


# --- the steps of one job -------------------------------------------------------------


def publish(job: PublishJob, handle: PublishHandle | None = None) -> Manifest:
    """Upload, verify and commit one artifact (in the calling thread). Returns its manifest.

    ``handle`` is the job's, for its account's ``status()`` (where the job has one).
    """
    remote = job.remote
    from ckptstore.staging import tf  # the version is recorded in the manifest

    call = artifact.caller(remote, job.redactor, job.retry)
    manifest = mf.describe_files(
        job.local_dir,
        job.name,
        job.files,
        kind=job.kind,
        number=job.number,
        step=job.step,
        timestamp=time.time(),
        with_md5=remote.backend.needs_md5,
        extra_versions={"tensorflow": tf.__version__},
        metadata=job.metadata,
    )
    call("create the remote directory", remote.prepare)
    existing = read_committed(remote, job.name, call)
    clean_interrupted(remote, job.name, call, keep=existing)
    marker = json.dumps(
        {
            "format": _PENDING_FORMAT,
            "files": [e.name for e in manifest.files]
            + ([job.name + mf.KERAS_NEXT_SUFFIX] if job.kind == mf.KERAS else []),
            "writer": manifest.writer,
        }
    ).encode("utf-8")
    call(
        "mark the upload as in progress",
        lambda: remote.backend.write_atomic(remote.path(pending_name(job.name)), marker),
    )
    transfer = progress.Transfer(
        f"Uploading {job.redactor.url}",
        manifest.total_bytes,
        bar=progress.tqdm_bar(job.shown, manifest.total_bytes) if progress.bars_enabled() else None,
        meter=job.account.meter if job.account is not None else None,
    )
    if job.account is not None and handle is not None:
        job.account.started(handle, transfer)
    upload = dict(
        call=call,
        concurrency=job.concurrency,
        progress=transfer.file,
        # A backend that reports nothing while it sends is counted a whole file at a time.
        on_verified=lambda entry: transfer.file_done(entry.size),
    )
    try:
        _upload_and_commit(job, manifest, existing, call, upload)
    except BaseException:
        transfer.finish(ok=False)
        raise
    transfer.finish()
    call("clear the in-progress marker", lambda: remote.delete_data([pending_name(job.name)]))
    log.info("Committed %s (%d bytes)", job.redactor.url, manifest.total_bytes)
    if job.after_commit is not None:
        try:
            job.after_commit(manifest)
        except Exception as exc:
            log.warning("After committing %s: %s", job.redactor.url, job.redactor.describe(exc))
            if job.account is not None:
                job.account.error(f"after committing {job.shown}: {job.redactor.describe(exc)}")
    return manifest


def _upload_and_commit(
    job: PublishJob,
    manifest: Manifest,
    existing: Manifest | None,
    call: Callable[[str, Callable[[], Any]], Any],
    upload: dict[str, Any],
) -> None:
    """The uploads and commits of :func:`publish`, between its marker and its clean-up."""
    remote = job.remote
    if job.kind == mf.KERAS and existing is not None and existing.files[0].name == job.name:
        # Overwriting a committed file in place would leave neither copy intact while
        # the bytes go up: commit the new one under a side name first.
        side = dataclasses.replace(
            manifest,
            files=(dataclasses.replace(manifest.files[0], name=job.name + mf.KERAS_NEXT_SUFFIX),),
        )
        artifact.upload_verified(remote, side, job.local_dir, **upload)
        call(f"commit {job.name}", lambda: remote.commit(side))
        entry = manifest.files[0]
        copied = call(f"copy {entry.name}", lambda: remote.copy(side.files[0].name, entry))
        if copied:
            call(f"verify {entry.name}", lambda: remote.verify(entry))
        else:
            artifact.upload_verified(remote, manifest, job.local_dir, **upload)
        call(f"commit {job.name}", lambda: remote.commit(manifest))
        call("delete the side copy", lambda: remote.delete_data([side.files[0].name]))
    else:
        if existing is not None and job.kind != mf.KERAS:
            # Withdraw first: no reader pairs the old manifest with new files.
            call(f"withdraw {job.name}", lambda: remote.uncommit(job.name))
        artifact.upload_verified(remote, manifest, job.local_dir, **upload)
        call(f"commit {job.name}", lambda: remote.commit(manifest))
        if existing is not None:
            stale = artifact.stale_files(existing, manifest)
            if stale:
                call("delete files the new save replaced", lambda: remote.delete_data(stale))


def read_committed(
    remote: Remote, name: str, call: Callable[[str, Callable[[], Any]], Any]
) -> Manifest | None:
    """The committed manifest of ``name``, or ``None`` (missing, or unreadable: warned)."""
    # fsspec clients answer "does it exist" from a cached listing of the directory when
    # they have one (s3fs, gcsfs): a process that listed the directory before another
    # process committed there would be told the manifest does not exist.
    remote.fs.invalidate_cache(remote.path(mf.manifest_name(name)))
    try:
        return call(f"read the manifest of {name}", lambda: remote.read_manifest(name))
    except FileNotFoundError:
        return None
    except ManifestError as exc:
        log.warning("Ignoring the manifest of %s on %s: %s", name, remote.url, exc)
        return None


def read_pending(remote: Remote, name: str) -> list[str] | None:
    """The files an interrupted upload of ``name`` listed, or ``None`` if none was marked."""
    try:
        data = remote.fs.cat_file(remote.path(pending_name(name)))
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("format") != _PENDING_FORMAT:
        return []
    return [f for f in doc.get("files", []) if mf.is_safe_relative_path(f)]


def clean_interrupted(
    remote: Remote,
    name: str,
    call: Callable[[str, Callable[[], Any]], Any],
    *,
    keep: Manifest | None,
) -> None:
    """Delete what a killed upload of ``name`` left, if ckptstore's marker says it was one.

    Only the files the marker lists, and never one the committed manifest
    (``keep``) vouches for.
    """
    leftovers = call("read the in-progress marker", lambda: read_pending(remote, name))
    if leftovers is None:
        return
    vouched = {e.name for e in keep.files} if keep is not None else set()
    doomed = [f for f in leftovers if f not in vouched]
    if doomed:
        log.info(
            "Removing %d file(s) of an interrupted upload of %s on %s",
            len(doomed),
            name,
            remote.url,
        )
        call("remove an interrupted upload", lambda: remote.delete_data(doomed))
    call("clear the in-progress marker", lambda: remote.delete_data([pending_name(name)]))


def _as_upload_error(job: PublishJob, exc: BaseException) -> UploadError:
    where = f" The local copy stays in {job.local_dir}." if os.path.isdir(job.local_dir) else ""
    return UploadError(
        f"{job.redactor.url} was not committed: {job.redactor.describe(exc)}. Whatever was "
        f"committed there before is untouched.{where} Save again to retry.",
        {job.name: exc},
    )


def _local_size(job: PublishJob) -> int:
    """Bytes of the job's local files (those already gone count 0)."""
    total = 0
    for name in job.files:
        with contextlib.suppress(OSError):
            total += os.path.getsize(os.path.join(job.local_dir, *name.split("/")))
    return total


def _remove_local(job: PublishJob) -> None:
    if job.remove_local:
        with contextlib.suppress(OSError):
            shutil.rmtree(job.local_dir)
