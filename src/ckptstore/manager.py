"""``ckptstore.CheckpointManager``: ``tf.train.CheckpointManager`` that survives the machine.

The facade composes the parts of the data path and does no I/O of its own:
:mod:`~ckptstore.staging` (TensorFlow's bookkeeping and state file),
:mod:`~ckptstore.uploader` (upload, verify, commit, retire in the background),
:mod:`~ckptstore.restore` (what to resume, fetching verified checkpoints).

Two modes, chosen from the arguments:

* **Local** - ``directory`` is a plain path on an ordinary filesystem (local
  disk, NFS, ...) and no ``staging_dir`` is given. The manager behaves exactly
  like TensorFlow's: same files, same state file, same return values, same
  retention. Nothing runs in the background.
* **Remote** - ``directory`` is a URL (``s3://``, ``gs://``, ``file://``,
  ``memory://``, any fsspec protocol), or ``staging_dir`` is given. TensorFlow
  writes into the staging directory; the upload, verification and commit run
  in a background thread, and a save counts once its manifest is committed.
  A plain path with no ``staging_dir`` on a cloud-synced FUSE mount (Colab's
  ``/content/drive``, gcsfuse, s3fs, rclone, ...: :mod:`~ckptstore.mounts`)
  is remote too, with the default staging directory: the mount is the remote,
  and reading back through it verifies each copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import os
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ckptstore import (
    __version__,
    backends,
    distribution,
    exit_drain,
    mounts,
    preemption,
    restore,
    staging,
)
from ckptstore.errors import (
    CkptStoreError,
    ConfigurationError,
    OwnershipError,
    RemoteUnavailableError,
    RestoreError,
)
from ckptstore.ownership import DEFAULT_LEASE_SECONDS, Lease, Liveness, judge
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy
from ckptstore.staging import tf
from ckptstore.staging_lock import StagingLock
from ckptstore.startup import StartupBudget
from ckptstore.status import CLOSED, LOCAL, READER, WRITER, Status
from ckptstore.uploader import BookSnapshot, Uploader, UploadRequest, UploadStatus, WhenBehind

log = logging.getLogger("ckptstore")

#: how long the first save() of a manager may wait for the remote (reading it, taking
#: the lease) before it saves locally and leaves the rest to the background upload
FIRST_SAVE_BUDGET_SECONDS = 10.0


def _evaluate(value: Any) -> Any:
    """The value of a variable or tensor, as TensorFlow's manager reads it (eager or session)."""
    if tf.executing_eagerly():
        return value.numpy()
    return tf.compat.v1.get_default_session().run(value)


def _require_checkpoint(checkpoint: Any, shown_url: str) -> None:
    """With a remote, refuse what is not a ``tf.train.Checkpoint`` before anything starts.

    TensorFlow's manager takes any object and fails at the first ``save()`` (an
    AttributeError); in local mode that stays so. With a remote the failure would
    come later still, at ``save()`` and again when the uploads drain at exit.
    """
    if isinstance(checkpoint, tf.train.Checkpoint):
        return
    kind = type(checkpoint)
    is_keras_model = any(
        c.__name__ == "Model" and c.__module__.split(".")[0] in ("keras", "tf_keras")
        for c in kind.__mro__
    )
    if is_keras_model:
        what = f"a Keras model ({kind.__name__})"
        fix = "tf.train.Checkpoint(model=model, optimizer=model.optimizer)"
    else:
        what = "None" if checkpoint is None else f"a {kind.__module__}.{kind.__qualname__}"
        fix = "tf.train.Checkpoint(model=model, optimizer=optimizer) with what to save"
    raise ConfigurationError(
        f"ckptstore.CheckpointManager for {shown_url} manages a tf.train.Checkpoint, and "
        f"was given {what}. Pass {fix} as its first argument."
    )


class CheckpointManager(tf.train.CheckpointManager):
    """Manages checkpoints like ``tf.train.CheckpointManager``, on any fsspec remote.

    A subclass of TensorFlow's class, so it is accepted wherever TensorFlow's code
    checks for one (``tf.distribute.experimental.PreemptionCheckpointHandler``
    branches on ``isinstance``). TensorFlow's ``__init__`` is deliberately not
    called: it reads and writes the directory with TensorFlow's file API, which
    knows none of these URLs; every public member is ckptstore's own.

    Example::

        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
        manager = ckptstore.CheckpointManager(ckpt, "s3://bucket/run-7", max_to_keep=3)
        ckpt.restore(manager.latest_checkpoint)   # fresh machine: downloads, verifies
        for batch in data:
            train_step(batch)
            manager.save()                        # returns after the local write
        manager.sync()                            # every save is verified on the remote

    The positional and keyword arguments are TensorFlow's, with its defaults.
    The keyword-only ones are ckptstore's:

    Args:
        staging_dir: local directory TensorFlow writes into before the upload.
            Defaults to a per-URL directory under ``~/.cache/ckptstore/staging``
            (``$CKPTSTORE_STAGING_DIR`` overrides the base), stable across
            restarts so a new process finishes its predecessor's uploads.
        storage_options: keyword arguments for the fsspec filesystem
            (credentials, endpoint, ...). Never logged or shown.
        max_pending_uploads: how many saved checkpoints may wait behind the one
            being uploaded.
        when_behind: ``"skip"`` (default) drops the oldest waiting upload when
            saves outpace the network, so training never waits and the newest
            checkpoint always goes next; ``"block"`` makes ``save()`` wait.
        retry: how transient storage errors are retried.
        upload_concurrency: files of one checkpoint uploaded in parallel, and
            parts of one file where the backend uploads in parts (S3).
        upload_part_size: bytes per part of a multipart upload (S3; at least 5 MiB;
            by default 8 to 32 MiB by file size, about 8 parts a file; parts go in
            parallel), and per chunk of a resumable upload
            (GCS; rounded down to 256 KiB; default 50 MiB, chunks go one after
            another). Parts and chunks stream from the staged file: memory does not
            grow with this size.
        read_only: never write to the remote (no lease, no upload, no deletion);
            ``latest_checkpoint`` still downloads and verifies. ``save()`` raises.
        takeover: take the run from a writer that is still alive (its lease has
            not expired). That writer is fenced: it commits nothing more, and its
            ``sync()`` raises :class:`~ckptstore.OwnershipError`.
        lease_seconds: how long a writer that stopped renewing its lease keeps
            the run (default 60). Another process's ``save()`` takes the run over
            only after that; a writer that died on this machine is replaced at once.
        startup_timeout: seconds the constructor may spend reading the remote (what it
            holds, and who writes it) before it raises
            :class:`~ckptstore.RemoteUnavailableError` (default 60; ``None``: as long as
            the retries take). After 5 s without an answer it logs a WARNING naming the
            URL and how long it keeps trying.

    One run has one writer. A manager opened on a URL whose writer is alive (an
    evaluator, a second notebook) reads it: it restores, never writes, and its
    ``save()`` raises :class:`~ckptstore.OwnershipError` naming the writer. A
    manager becomes the writer at its first ``save()``, or at once when it finds
    checkpoints of its predecessor to upload in its staging directory.
    """

    def __init__(
        self,
        checkpoint: Any,
        directory: str | os.PathLike,
        max_to_keep: int | None,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        step_counter: Any = None,
        checkpoint_interval: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        last_checkpoint_step: int | None = None,
        *,
        staging_dir: str | os.PathLike | None = None,
        storage_options: Mapping[str, Any] | None = None,
        max_pending_uploads: int = 2,
        when_behind: WhenBehind | str = WhenBehind.SKIP,
        retry: RetryPolicy | None = None,
        upload_concurrency: int = 4,
        upload_part_size: int | None = None,
        read_only: bool = False,
        takeover: bool = False,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        startup_timeout: float | None = 60.0,
    ):
        # TensorFlow's checks and attributes first, in TensorFlow's order.
        self._checkpoint = checkpoint
        self._save_counter_assign = None  # graph mode: the op that counts a save
        if max_to_keep is not None and max_to_keep <= 0:
            raise ValueError(
                # TensorFlow's message, word for word.
                "Expected a positive integer or `None` for `max_to_keep`, got %d."  # noqa: UP031
                % (max_to_keep,)
            )
        if isinstance(directory, os.PathLike):
            directory = os.fspath(directory)
        self._directory = directory
        self._checkpoint_name = checkpoint_name
        self._init_fn = init_fn
        self._step_counter = step_counter
        self._last_checkpoint_step = None
        if checkpoint_interval is not None:
            if step_counter is None:
                raise ValueError(
                    "`step_counter` should be passed if `checkpoint_interval` is not None."
                )
            self._last_checkpoint_step = last_checkpoint_step
        self._checkpoint_interval = checkpoint_interval

        self._lock = threading.RLock()
        self._redactor = Redactor(str(directory), storage_options)
        self._retry = retry or RetryPolicy()
        self._startup = StartupBudget(
            self._redactor.url, startup_timeout, describe=self._redactor.describe
        )
        self._uploader: Uploader | None = None
        self._remote: Remote | None = None
        self._restorable: str | None = None  # verified local prefix behind latest_checkpoint
        self._restorable_for: str | None = None  # the book's latest it was resolved for
        self._closed = False
        self._role = distribution.SINGLE
        self._worker_dir: str | None = None  # a non-chief worker's workertemp_<task_id>
        self._worker_lock: Any = None  # held on a non-chief worker's private directory
        self._exit_deadline: float | None = None  # a preempted process must be gone by then
        if max_pending_uploads < 1:
            raise ConfigurationError("max_pending_uploads must be at least 1")

        backends.check_for_url_typos(directory)
        remote_mode = backends.is_remote_url(directory) or staging_dir is not None
        if staging_dir is not None:
            staging_dir = os.fspath(staging_dir)
        if (
            staging_dir is not None
            and not backends.is_remote_url(directory)
            and os.path.abspath(staging_dir) == os.path.abspath(directory)
        ):
            remote_mode = False  # staging into the directory itself is plain local mode
        if not remote_mode and staging_dir is None:
            # On a cloud-synced mount, TensorFlow's direct write blocks training on
            # the FUSE daemon, and a runtime killed mid-write can leave a checkpoint
            # there that looks complete. Treat the mount as the remote: stage on
            # local disk, copy and verify in the background, commit by manifest.
            mount = mounts.cloud_synced_mount(directory)
            if mount is not None:
                remote_mode = True
                # The absolute path: a relative one would share staging across cwds.
                staging_dir = staging.default_staging_dir(os.path.abspath(directory))
                log.info(
                    "ckptstore: %s is on a cloud-synced mount (%s at %s). Checkpoints are "
                    "staged in %s and copied to the mount in the background, each copy "
                    "verified by reading it back through the mount. Pass staging_dir= to "
                    "stage elsewhere (staging_dir=%r writes directly, as TensorFlow does).",
                    directory,
                    mount.fstype,
                    mount.mount_point,
                    staging_dir,
                    directory,
                )

        if not remote_mode:
            self._staging_dir = directory
            self._book = staging.CheckpointBook(
                directory, max_to_keep, keep_checkpoint_every_n_hours
            )
            self._book.recover(staging.read_state_file(directory))
            return

        _require_checkpoint(checkpoint, self._redactor.url)
        self._role = distribution.role_of(checkpoint, self._redactor.url)
        if self._role.multi_worker and self._role.chief:
            # TensorFlow names one chief per cluster: a chief restarted on another machine
            # replaces the dead one at once, rather than failing its first save() (and
            # hanging every other worker) until the old lease expires.
            takeover = True
        if self._role.multi_worker and not self._role.chief:
            # TensorFlow's chief writes; this worker only takes part in each save and
            # restores what the chief committed (distribution.py).
            read_only = True
        try:
            self._open_remote(
                staging_dir,
                storage_options,
                max_to_keep=max_to_keep,
                keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
                max_pending_uploads=max_pending_uploads,
                when_behind=WhenBehind(when_behind),
                upload_concurrency=upload_concurrency,
                upload_part_size=upload_part_size,
                read_only=read_only,
                takeover=takeover,
                lease_seconds=lease_seconds,
            )
        except BaseException:
            # A manager that failed to open holds no staging directory, even while
            # something keeps it alive (a notebook's last traceback, a start-up read
            # abandoned in its thread): the next one opened there may write.
            if self._uploader is None and getattr(self, "_staging_lock", None) is not None:
                self._staging_lock.release()
            raise

    def _open_remote(
        self,
        staging_dir: str | None,
        storage_options: Mapping[str, Any] | None,
        *,
        max_to_keep: int | None,
        keep_checkpoint_every_n_hours: float | None,
        max_pending_uploads: int,
        when_behind: WhenBehind,
        upload_concurrency: int,
        upload_part_size: int | None,
        read_only: bool,
        takeover: bool,
        lease_seconds: float,
    ) -> None:
        """Remote mode: read what the remote holds, then decide whether to write or read."""
        directory = self._directory
        backend, root = backends.resolve(
            directory if backends.is_remote_url(directory) else os.path.abspath(directory),
            storage_options,
        )
        backend.concurrency = upload_concurrency
        if upload_part_size is not None:
            backend.part_size = upload_part_size
        self._remote = Remote(backend, root, self._redactor.url)
        self._uploader_options = {
            "max_pending": max_pending_uploads,
            "when_behind": when_behind,
            "concurrency": upload_concurrency,
        }
        self._read_only, self._takeover = read_only, takeover
        self._lease = Lease(
            self._remote,
            lease_seconds=lease_seconds,
            redactor=self._redactor,
            library_version=__version__,
        )
        self._staging_dir = staging.prepare_staging_dir(
            staging_dir or staging.default_staging_dir(self._redactor.url)
        )
        self._staging_lock = StagingLock(self._staging_dir)
        self._not_writer_because: str | None = None
        worker = self._role.multi_worker and not self._role.chief
        if worker:
            self._not_writer_because = (
                f"this is worker {self._role.task_id} of a {self._role.strategy} cluster, and "
                "only the chief writes"
            )
        elif read_only:
            self._not_writer_because = "it was opened with read_only=True"
        elif not self._staging_lock.acquire():
            self._not_writer_because = (
                f"its staging directory {self._staging_dir} is in use by another manager on "
                f"this machine (pid {self._staging_lock.holder_pid()}); pass staging_dir= a "
                "directory of its own to write from this process"
            )
        if not self._staging_lock.held:
            # Never write into a staging directory another live process owns:
            # downloads go to a private one, removed when this manager goes.
            if worker:
                # On the disk this worker was told to stage on (staging_dir=, else the
                # default), inside it, locked while this manager lives.
                self._staging_dir, self._worker_lock = distribution.worker_staging_dir(
                    self._staging_dir, self._role.task_id
                )
            else:
                self._staging_dir = staging.private_staging_dir(self._redactor.url)
            weakref.finalize(self, shutil.rmtree, self._staging_dir, ignore_errors=True)

        if self._staging_lock.held:
            for leftover in staging.remove_partial_writes(self._staging_dir):
                log.info("Removed %s, a write interrupted by a crash", leftover)
        view = self._startup.run(
            "listing it and reading its manifests",
            lambda: restore.read_remote(
                self._remote,
                self._retry,
                self._redactor,
                checkpoint_name=self._checkpoint_name,
                stop=self._startup.expired,
                on_failure=self._startup.failed,
            ),
        )
        plan = restore.plan_resume(
            view, self._staging_dir, resume_staged=not self._role.multi_worker
        )
        if worker:
            self._worker_dir = os.path.join(self._staging_dir, f"workertemp_{self._role.task_id}")
        if self._staging_lock.held:
            # Staging is this process's (its lock says no other live process uses it):
            # copies of checkpoints nobody manages any more go. The remote is untouched.
            restore.drop_unmanaged_staged(self._staging_dir, plan.managed)
        self._committed_view = dict(plan.committed)
        self._book = staging.CheckpointBook(
            self._staging_dir, max_to_keep, keep_checkpoint_every_n_hours
        )
        self._book.recover(plan.state)
        if self._staging_lock.held:
            self._book.write_state_file()

        holder, _ = self._startup.run(
            "reading its writer lease",
            lambda: self._call_remote("read the writer lease on", self._lease.read),
        )
        live = judge(holder) == Liveness.ALIVE
        if self._not_writer_because is None and (takeover or (plan.to_upload and not live)):
            # Checkpoints of a dead predecessor wait in staging: this is its successor.
            self._become_writer(view, plan)
        elif self._not_writer_because is None and live and holder is not None:
            self._not_writer_because = f"{holder.describe()} writes it"
        if self._not_writer_because is not None and holder is not None and live:
            # Once per manager. A warning unless reading is what was asked for.
            why = " (read_only=True)" if read_only else ""
            if worker:
                why = f" ({self._not_writer_because})"
            log.log(
                logging.INFO if read_only else logging.WARNING,
                "ckptstore: %s is written by %s; this manager reads it: it restores but "
                "never writes there%s.",
                self._redactor.url,
                holder.describe(),
                why,
            )
        if plan.to_upload and self._uploader is None and self._staging_lock.held:
            log.warning(
                "ckptstore: %d checkpoint(s) staged in %s were never committed to %s; they "
                "stay staged and are uploaded once this manager writes the run (%s).",
                len(plan.to_upload),
                self._staging_dir,
                self._redactor.url,
                self._not_writer_because or "at its first save()",
            )

    def _call_remote(self, what: str, operation: Callable[[], Any]) -> Any:
        """One read of the remote, retried; a failure says what could not be read."""
        assert self._remote is not None
        try:
            return self._retry.call(
                operation,
                is_transient=self._remote.backend.is_transient,
                what=f"{what} {self._redactor.url}",
                scrub=self._redactor.scrub,
            )
        except CkptStoreError:
            raise
        except Exception as exc:
            raise RemoteUnavailableError(
                f"Could not {what} {self._redactor.url}: {self._redactor.describe(exc)}. "
                "Check the URL, the network and the credentials."
            ) from None

    def _ensure_writer(self) -> None:
        """Make this manager the run's writer before its first write, or raise why not."""
        if self._uploader is not None or self._remote is None:
            return
        if self._not_writer_because is not None and not self._staging_lock.held:
            raise OwnershipError(
                f"This manager does not write {self._redactor.url}: {self._not_writer_because}."
            )
        if self._read_only:
            raise OwnershipError(
                f"This manager was opened with read_only=True and never writes "
                f"{self._redactor.url}; open one without it to save."
            )
        # The first save() must not hang on the network either: a bounded look at the
        # remote, and if it cannot be had, the view from when the manager opened.
        budget = StartupBudget(
            self._redactor.url, FIRST_SAVE_BUDGET_SECONDS, describe=self._redactor.describe
        )
        try:
            view, plan = budget.run("reading it before the first save", self._read_plan)
        except CkptStoreError as exc:
            log.warning(
                "ckptstore: %s The checkpoint is saved locally; it is uploaded once the "
                "remote answers (sync() raises until then).",
                exc,
            )
            view = restore.RemoteView([], dict(self._committed_view), None, {})
            plan = restore.ResumePlan(None, dict(self._committed_view), [], [], set())
            self._become_writer(view, plan, budget)
            return
        self._become_writer(view, plan, budget)
        if set(plan.committed) != set(self._committed_view) or plan.to_upload:
            # The remote moved on while this manager only read it (the previous
            # writer committed more): manage what is there now. Otherwise the book
            # stays as opened, with TensorFlow's preservation clock from then.
            with self._lock:
                self._book.recover(plan.state)
                self._committed_view = dict(plan.committed)
                self._restorable = None

    def _read_plan(self) -> tuple[restore.RemoteView, restore.ResumePlan]:
        assert self._remote is not None
        view = restore.read_remote(
            self._remote, self._retry, self._redactor, checkpoint_name=self._checkpoint_name
        )
        return view, restore.plan_resume(
            view, self._staging_dir, resume_staged=not self._role.multi_worker
        )

    def _refresh_view(self) -> None:
        """A reader's second look at the remote: manage what is committed now."""
        _, plan = self._read_plan()
        with self._lock:
            self._book.recover(plan.state)
            self._committed_view = dict(plan.committed)
            self._restorable = None

    def _become_writer(
        self,
        view: restore.RemoteView,
        plan: restore.ResumePlan,
        budget: StartupBudget | None = None,
    ) -> None:
        """Take the lease, then do what only the writer may: adopt, resume, retire, tidy."""
        assert self._remote is not None
        budget = budget or self._startup
        try:
            budget.run(
                "creating its directory",
                lambda: self._call_remote("create the remote directory", self._remote.prepare),
            )
            budget.run(
                "taking its writer lease",
                lambda: self._call_remote(
                    "take the writer lease on", lambda: self._lease.acquire(force=self._takeover)
                ),
            )
        except OwnershipError:
            raise
        except CkptStoreError as exc:
            # The remote cannot be reached or refuses: training must not stop for the
            # network. Save locally; the uploader takes the lease before its first
            # upload, and sync() reports what keeps failing.
            log.warning(
                "ckptstore: %s Checkpoints are staged in %s and uploaded once %s can be "
                "written (sync() raises until then).",
                exc,
                self._staging_dir,
                self._redactor.url,
            )
        self._not_writer_because = None
        if view.adoptable and self._lease.held:
            self._call_remote(
                "adopt the checkpoints on", lambda: restore.adopt(self._remote, view.adoptable)
            )
        self._uploader = Uploader(
            self._remote,
            self._staging_dir,
            snapshot=self._snapshot,
            committed=plan.committed,
            redactor=self._redactor,
            retry=self._retry,
            extra_versions={"tensorflow": tf.__version__},
            lease=self._lease,
            takeover=self._takeover,
            **self._uploader_options,
        )
        self._uploader.submit(None, retired=plan.retired)
        for request in plan.to_upload:
            log.info("Resuming the upload of %s, staged but never committed", request.checkpoint)
            self._uploader.submit(request, retired=[])
        _drain_at_exit(self)

    # --- TensorFlow's public members ------------------------------------------------

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint_interval(self) -> int | None:
        return self._checkpoint_interval

    @property
    def checkpoint(self) -> Any:
        """Returns the `tf.train.Checkpoint` object."""
        return self._checkpoint

    @property
    def checkpoints(self) -> list[str]:
        """Managed checkpoint prefixes, oldest first (TensorFlow's ``checkpoints``).

        With a remote these are staging paths; only :attr:`latest_checkpoint` is
        downloaded on demand.
        """
        with self._lock:
            return list(self._book.active.keys())

    @property
    def latest_checkpoint(self) -> str | None:
        """The prefix of the most recent checkpoint, ready for ``checkpoint.restore()``.

        With a remote on a fresh machine, the first access downloads the newest
        committed checkpoint into staging and verifies every file against its
        manifest; a checkpoint that fails is never returned (the previous one
        is, with a warning). ``None`` only when the remote holds no checkpoint.
        """
        with self._lock:
            try:
                return self._fetch_latest()
            except RestoreError:
                if self._uploader is not None:
                    raise
                # A reader's view is from when it opened: the writer may have retired
                # those checkpoints since (and committed newer ones). Look again, once.
                self._refresh_view()
                return self._fetch_latest()

    def _fetch_latest(self) -> str | None:
        with self._lock:
            latest = self._book.latest
            if self._remote is None or latest is None:
                return latest
            if self._restorable is not None and self._restorable_for == latest:
                return self._restorable
            candidates = [os.path.basename(p) for p in reversed(self._book.active)]
            if os.path.basename(latest) not in candidates:
                candidates.insert(0, os.path.basename(latest))
            committed = self._uploader.committed() if self._uploader else self._committed_view
            preserved = sorted(
                (n for n in committed if n not in candidates),
                key=lambda n: committed[n].timestamp,
                reverse=True,
            )
            self._record_downloads(committed, candidates + preserved)
            prefix = restore.fetch_restorable(
                self._remote,
                committed,
                candidates + preserved,
                self._staging_dir,
                self._retry,
                self._redactor,
            )
            self._restorable, self._restorable_for = prefix, latest
            return prefix

    def save(
        self, checkpoint_number: Any = None, check_interval: bool = True, options: Any = None
    ) -> str | None:
        """Write a checkpoint to staging and queue its upload; TensorFlow's ``save``.

        Returns the local checkpoint prefix as soon as TensorFlow's write is
        done (or dispatched, with ``CheckpointOptions(enable_async=True)``);
        ``None`` if ``checkpoint_interval`` says not to save yet.
        """
        if self._closed:
            raise RuntimeError("This CheckpointManager is closed; create a new one to save.")
        session = None if tf.executing_eagerly() else self._graph_session()
        # Before anything changes (counter, files): a manager that may not write says so.
        if self._worker_dir is None:
            self._ensure_writer()
        if self._checkpoint_interval is not None:
            current_step = _evaluate(self._step_counter)
            if self._last_checkpoint_step is not None:
                if current_step == self._last_checkpoint_step:
                    return None
                if check_interval and current_step < (
                    self._last_checkpoint_step + self._checkpoint_interval
                ):
                    return None
            self._last_checkpoint_step = current_step

        # TensorFlow's save counter, eagerly or through the tf.compat.v1 session.
        if session is None:
            save_counter = self._checkpoint.save_counter
            save_counter.assign_add(1)
        else:

            def _initializing_creator(next_creator: Any, **kwargs: Any) -> Any:
                """Initialize the save counter if it has been newly created."""
                v = next_creator(**kwargs)
                session.run(v.initializer)
                return v

            with tf.variable_creator_scope(_initializing_creator):
                save_counter = self._checkpoint.save_counter
            if self._save_counter_assign is None:
                self._save_counter_assign = save_counter.assign_add(1, read_value=False)
            session.run(self._save_counter_assign)
        if checkpoint_number is None:
            checkpoint_number = save_counter
        if not isinstance(checkpoint_number, (numbers.Integral, np.integer)):
            checkpoint_number = int(_evaluate(checkpoint_number))
        prefix = "%s-%d" % (  # noqa: UP031  (TensorFlow's naming, %d of a numpy int)
            os.path.join(self._staging_dir, self._checkpoint_name),
            checkpoint_number,
        )
        if self._worker_dir is not None:
            return self._write_as_worker(prefix, options)
        step = self._step_for_manifest()
        number = int(checkpoint_number)

        def _record_and_sweep_state(save_path: str) -> None:
            self._on_written(save_path, number, step)

        if options is None:
            options = tf.train.CheckpointOptions(
                experimental_write_callbacks=[_record_and_sweep_state]
            )
        else:
            # Copy the options and their callback list: the caller's stay untouched.
            options = copy.copy(options)
            callbacks = list(options.experimental_write_callbacks or [])
            options.experimental_write_callbacks = [*callbacks, _record_and_sweep_state]
        if self._remote is not None:
            # Journaled before TensorFlow writes a byte: staging deletes only what it staged.
            staging.record_staged(self._staging_dir, [os.path.basename(prefix)])
        save_path = self._checkpoint.write(prefix, options=options)
        if self._uploader is not None and preemption.in_preemption_save():
            self._commit_before_exit(os.path.basename(prefix))
        return save_path

    def _write_as_worker(self, prefix: str, options: Any) -> str:
        """A worker that is not the chief: TensorFlow's write, in its own directory, then gone.

        Every worker takes part in the write (variables are all-reduced while
        saving); only the chief's copy is uploaded. TensorFlow's convention puts a
        worker's copy in ``workertemp_<task_id>`` and deletes it after. The
        caller's options go to TensorFlow as given: its write callbacks see this
        copy, as they would under TensorFlow's convention; nothing is recorded or
        queued for upload.
        """
        assert self._worker_dir is not None
        os.makedirs(self._worker_dir, exist_ok=True)
        try:
            save_path = self._checkpoint.write(
                os.path.join(self._worker_dir, os.path.basename(prefix)), options=options
            )
            self._checkpoint.sync()  # an async write must finish before its files go
        finally:
            shutil.rmtree(self._worker_dir, ignore_errors=True)
        return save_path

    def _commit_before_exit(self, name: str) -> None:
        """TensorFlow's preemption handler saved: commit before it ends the process.

        Bounded by the handler's grace period where it has one; when the upload
        cannot make it, say so (the previous commit stays the restorable one).
        """
        assert self._uploader is not None
        deadline = preemption.grace_deadline()
        if self._exit_deadline is not None:
            # With a grace period the handler saves twice. A SIGTERM that came again in
            # between makes TensorFlow record a later signal time (in local mode); the
            # platform's deadline is still the first one's.
            deadline = min(deadline or self._exit_deadline, self._exit_deadline)
        self._exit_deadline = deadline
        left = preemption.seconds_left(deadline)
        log.warning(
            "ckptstore: preempted; committing %s to %s before the process exits%s.",
            name,
            self._redactor.url,
            "" if left is None else f" (grace period: {left:.1f} s left)",
        )
        started = time.monotonic()
        finished = self._uploader.wait(left)
        committed = self._uploader.committed()
        if name in committed:  # committed, even if upkeep after it (the state file) is not done
            log.warning(
                "ckptstore: %s committed to %s in %.1f s.",
                name,
                self._redactor.url,
                time.monotonic() - started,
            )
            return
        restorable = max(committed.values(), key=lambda m: m.timestamp, default=None)
        failure = self._uploader.status().failed.get(name)
        if failure is not None:
            why = f"(its upload failed: {failure})"
        elif finished:
            why = "(it was not uploaded; sync() says why)"
        else:
            why = "within the grace period"
        log.error(
            "ckptstore: the preemption checkpoint %s could not be committed to %s %s; %s. It "
            "stays staged in %s, and the next manager on that staging directory uploads it.",
            name,
            self._redactor.url,
            why,
            f"{restorable.checkpoint} stays the restorable one"
            if restorable is not None
            else "nothing is committed there yet",
            self._staging_dir,
        )

    def _graph_session(self) -> Any:
        """The tf.compat.v1 session a graph-mode ``save()`` runs in, or why there is none.

        Raised before anything changes: no counter increment, no interval step, no file.
        """
        if self._remote is not None:
            raise ConfigurationError(
                "ckptstore.CheckpointManager.save() with a remote needs eager execution "
                "(TensorFlow 2's default): call it outside tf.function and tf.compat.v1 "
                "graphs. With a plain local directory it also runs in a tf.compat.v1 "
                "session, as TensorFlow's manager does."
            )
        session = tf.compat.v1.get_default_session()
        if session is None:
            raise ConfigurationError(
                "ckptstore.CheckpointManager.save() is building a graph with no default "
                "tf.compat.v1.Session to run it in (inside tf.function, for example): call "
                "save() outside tf.function, or inside `with session.as_default():`."
            )
        return session

    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint, or call ``init_fn`` when there is none (TensorFlow's)."""
        latest = self.latest_checkpoint
        if latest is not None:
            self._checkpoint.restore(latest)
            if self._checkpoint_interval is not None:
                self._last_checkpoint_step = _evaluate(self._step_counter)
            return latest
        if self._init_fn is not None:
            self._init_fn()
            # TensorFlow's line, through TensorFlow's logger.
            tf.get_logger().info("Customized initialization is done through the passed `init_fn`.")
        return None

    def sync(self, *, timeout: float | None = None) -> None:
        """Wait for pending writes and uploads; raise what failed.

        After it returns, every checkpoint saved so far (and not skipped as
        superseded) is verified and committed on the remote, and the upkeep
        (retirement, TensorFlow's state file, orphans) is done.

        Args:
            timeout: seconds to wait for the uploads (``None``: as long as they
                take). The uploads go on in the background after a timeout.

        Raises:
            UploadError: an upload or the upkeep failed (the next ``sync()``
                tries the upkeep again; failed checkpoints stay staged).
            OwnershipError: another process took the run over; nothing more was
                committed by this manager.
            TimeoutError: ``timeout`` passed first; the message names what is pending.
        """
        if self._checkpoint:
            self._checkpoint.sync()
        if self._uploader is not None:
            if not self._uploader.wait(timeout):
                raise TimeoutError(
                    f"ckptstore: after {timeout} s, still pending for {self._redactor.url}: "
                    f"{self._uploader.describe_pending()}. The uploads go on in the background; "
                    "call sync() again to wait for them."
                )
            self._uploader.raise_failures()

    # --- ckptstore's additions ---------------------------------------------------------

    def delete_all(self, *, timeout: float | None = None) -> None:
        """Delete every checkpoint of the run, and TensorFlow's state file, when nobody needs them.

        For a run that is over (``ckptstore.keras.BackupAndRestore`` calls it at the end
        of a successful ``fit()``, as Keras deletes its backup). Saves made before
        this call and still waiting to upload are dropped (they would be deleted right
        after); the upload in flight finishes. Then every committed checkpoint is
        retired as retention retires one: the writer lease is renewed first, the
        manifest goes before the data, and the oldest checkpoint goes first, so a
        process killed midway leaves the newest one committed and restorable. Then the
        remote ``checkpoint`` state file goes, and the staged copies with it, so no
        later manager on this staging directory uploads them again. The writer lease
        stays, released at :meth:`close`: while it is there, data a kill left behind is
        known as ckptstore's leftovers, never adopted as a TensorFlow directory. The
        manager stays open: the next ``save()`` starts the run afresh.

        In local mode (a plain path) the checkpoints the manager manages and the state
        file are deleted at once, as TensorFlow deletes retired ones.

        Example::

            manager.sync()                  # everything is committed: the run is over
            manager.delete_all()            # ... and its checkpoints are not needed any more
            assert manager.latest_checkpoint is None

        Args:
            timeout: seconds to wait for the upload in flight and the deletions
                (``None``: as long as they take); they go on in the background after it.

        Raises:
            OwnershipError: another process writes the run; nothing was deleted.
            UploadError: an upload made before this call failed, or a deletion failed
                (the next :meth:`sync` tries the deletion again).
            TimeoutError: ``timeout`` passed first.
        """
        if self._closed:
            raise RuntimeError("This CheckpointManager is closed; create a new one.")
        if self._checkpoint:
            self._checkpoint.sync()  # an async save still writing would be queued after this
        if self._worker_dir is not None:
            return  # a worker that is not the chief: the chief deletes the run's checkpoints
        if self._remote is None:
            with self._lock:
                for prefix in self._book.active:
                    staging.remove_checkpoint(prefix)
                state_file = os.path.join(self._directory, "checkpoint")
                if tf.io.gfile.exists(state_file):
                    tf.io.gfile.remove(state_file)
                self._book.recover(None)
            return
        self._ensure_writer()  # only the run's writer deletes, and it proves it before each
        assert self._uploader is not None
        with self._lock:
            staged = [os.path.basename(p) for p in self._book.active]
            self._book.recover(None)
            self._committed_view = {}
            self._restorable = self._restorable_for = None
            with contextlib.suppress(FileNotFoundError):  # the staged copy of the state file
                os.remove(os.path.join(self._staging_dir, "checkpoint"))
            self._uploader.delete_all(staged)
        self.sync(timeout=timeout)

    @property
    def staging_dir(self) -> str:
        """The local directory TensorFlow writes into (``directory`` itself in local mode)."""
        return self._staging_dir

    def fetch(self, checkpoint: str) -> str:
        """A local prefix of any committed checkpoint, downloaded and verified if needed.

        For the checkpoints :attr:`latest_checkpoint` does not name: above all
        those kept by ``keep_checkpoint_every_n_hours``, which TensorFlow leaves
        on disk but lists nowhere (nor does :attr:`checkpoints`). ``checkpoint``
        is a name (``"ckpt-4"``) or a prefix ending in one (a staging path, or
        the same path under the remote's URL). In local mode the checkpoint is
        already there and its prefix is returned as is. Example::

            ckpt.restore(manager.fetch("ckpt-4"))

        Raises:
            RestoreError: no committed (or staged) checkpoint has that name, or
                its stored copy fails verification.
        """
        name = os.path.basename(os.fspath(checkpoint).rstrip("/"))
        if name.endswith(".index"):
            name = name[: -len(".index")]
        prefix = os.path.join(self._staging_dir, name)
        if self._remote is None:
            if not tf.io.gfile.exists(prefix + ".index"):
                raise RestoreError(f"There is no checkpoint {prefix!r}: {prefix}.index is missing.")
            return prefix
        with self._lock:
            committed = self._uploader.committed() if self._uploader else self._committed_view
            self._record_downloads(committed, [name])
            found = restore.fetch_restorable(
                self._remote, committed, [name], self._staging_dir, self._retry, self._redactor
            )
        if found is None:
            shown = ", ".join(sorted(committed)) or "none"
            raise RestoreError(
                f"{self._redactor.url} holds no committed checkpoint {name!r} (committed: "
                f"{shown}), and none is staged in {self._staging_dir}."
            )
        return found

    def upload_status(self) -> UploadStatus | None:
        """Committed, pending, failed and skipped uploads; ``None`` in local mode.

        A manager that reads the run (it does not write it) reports what it saw
        committed when it opened, and nothing pending.
        """
        if self._uploader is not None:
            return self._uploader.status()
        if self._remote is None:
            return None
        return UploadStatus(
            committed=tuple(self._committed_view),
            in_flight=None,
            pending=(),
            failed={},
            skipped=(),
            bytes_uploaded=0,
            retries=0,
        )

    def status(self) -> Status:
        """Where the uploads stand, in one object whose ``str()`` is one line for a log.

        Pending checkpoints (the one uploading first), bytes left to send, the
        recent upload rate, the last commit and when, the last error (credentials
        removed). The last error stays after later commits, with its time: the
        line shows both ages, so which came last is plain. Reading it costs no
        request to the remote.

        Example::

            for step, batch in enumerate(data):
                train_step(batch)
                if step % 1000 == 0:
                    manager.save()
                    logging.info("%s", manager.status())
            # ckptstore s3://b/run: 1 pending (ckpt-8 uploading, 312.4 MB left at
            #     38.2 MB/s); last commit ckpt-7 40 s ago; no errors      (one line)

        A manager that reads the run (another process writes it, or
        ``read_only=True``) reports role ``"reader"`` and the newest checkpoint it
        saw committed; a plain local directory reports role ``"local"`` and its
        newest save; a closed manager, role ``"closed"``.
        """
        if self._remote is None:
            with self._lock:
                saves = list(self._book.active.items())
            latest = saves[-1] if saves else None
            return Status(
                url=self._directory,
                role=CLOSED if self._closed else LOCAL,
                committed=len(saves),
                last_commit=os.path.basename(latest[0]) if latest else None,
                last_commit_time=latest[1] if latest else None,
            )
        if self._uploader is not None:
            lost = self._uploader.lost is not None or self._lease.lost is not None
            role = CLOSED if self._closed else READER if lost else WRITER
            return self._uploader.summary(self._redactor.url, role)
        committed = self._committed_view
        newest = max(committed.values(), key=lambda m: m.timestamp, default=None)
        if self._closed:
            role = CLOSED
        elif self._not_writer_because is not None or self._read_only:
            role = READER
        else:
            role = WRITER  # it takes the run at its first save()
        return Status(
            url=self._redactor.url,
            role=role,
            committed=len(committed),
            last_commit=newest.checkpoint if newest is not None else None,
            last_commit_time=newest.timestamp if newest is not None else None,
        )

    @property
    def is_writer(self) -> bool:
        """Whether this manager writes the run (holds its lease); ``True`` in local mode."""
        if self._remote is None:
            return True
        return self._uploader is not None and self._uploader.lost is None

    def close(self, *, timeout: float | None = None) -> None:
        """Finish every pending upload, stop the worker, give the run up, and raise what failed.

        Args:
            timeout: seconds to wait for pending uploads. When it passes, retries
                are cut short, nothing more is committed, the unfinished
                checkpoints stay staged for the next manager on this staging
                directory, and :class:`TimeoutError` names them.
        """
        if self._closed:
            return
        timed_out = False
        try:
            self.sync(timeout=timeout)
        except TimeoutError:
            timed_out = True
            raise
        finally:
            self._closed = True
            if self._uploader is not None:
                self._uploader.close(wait=False)
                if timed_out:
                    log.warning(
                        "ckptstore: closed %s with uploads unfinished; they stay staged in %s "
                        "and the next manager on that staging directory uploads them.",
                        self._redactor.url,
                        self._staging_dir,
                    )
            if self._remote is not None:
                self._lease.release()
                self._staging_lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception already on its way out
            self.close()
        except Exception as close_error:
            log.error(
                "ckptstore: while handling %s, close() failed: %s",
                exc_type.__name__,
                self._redactor.describe(close_error),
            )

    def __repr__(self) -> str:
        where = self._redactor.url if self._remote is not None else self._directory
        return (
            f"ckptstore.CheckpointManager({where!r}, max_to_keep={self._book.max_to_keep!r}, "
            f"staging_dir={self._staging_dir!r})"
        )

    # --- internals ---------------------------------------------------------------------

    def _on_written(self, save_path: str, number: int, step: int | None) -> None:
        """TensorFlow's ``_record_and_sweep_state``, plus queueing the upload."""
        if self._uploader is not None:
            self._uploader.wait_for_room()
        with self._lock:
            timestamp = time.time()
            self._book.add(save_path, timestamp)
            # Record before deleting anything (a preemption mid-sweep then still
            # sees the new checkpoint), sweep, record again: TensorFlow's order.
            self._book.write_state_file()
            doomed = self._book.sweep()
            if self._uploader is None:
                for prefix in doomed:
                    staging.remove_checkpoint(prefix)
            else:
                request = UploadRequest(os.path.basename(save_path), number, step, timestamp)
                dropped = self._uploader.submit(request, [os.path.basename(p) for p in doomed])
                for name in dropped:
                    self._book.forget(os.path.join(self._staging_dir, name))
                self._restorable = None
            self._book.write_state_file()

    def _record_downloads(self, committed: Mapping[str, Any], names: list[str]) -> None:
        """Journal the committed checkpoints a fetch may download (before it writes a byte).

        Staging then tidies them like the ones it saved; a copy already there is
        left as it is (it may be the user's own).
        """
        missing = [
            n
            for n in names
            if n in committed and not os.path.exists(os.path.join(self._staging_dir, n + ".index"))
        ]
        staging.record_staged(self._staging_dir, missing)

    def _step_for_manifest(self) -> int | None:
        """The step to record in the manifest, if ``step_counter`` can tell it.

        TensorFlow reads ``step_counter`` only for the interval check, so a
        value it would accept (any object, without ``checkpoint_interval``)
        must not make ``save()`` fail here: an unreadable one records no step.
        """
        if self._uploader is None or self._step_counter is None:
            return None
        value = self._step_counter
        try:
            return int(value.numpy() if hasattr(value, "numpy") else value)
        except (TypeError, ValueError):
            return None

    def _snapshot(self) -> BookSnapshot:
        with self._lock:
            return BookSnapshot(
                managed=tuple((os.path.basename(p), ts) for p, ts in self._book.active.items()),
                last_preserved_timestamp=self._book.last_preserved_timestamp,
            )


#: after a preempted process's deadline, how long its exit may still take to close the manager
#: when nothing is left to upload (stopping the idle worker, releasing the writer lease)
_CLOSE_ALLOWANCE_SECONDS = 1.0


def _close_by(m: CheckpointManager, deadline: float) -> None:
    """``m.close()``, given until ``deadline`` (``time.time()``) plus a short allowance.

    ``close(timeout=)`` bounds the wait for the uploads, but then gives the upload
    worker 5 s to stop, which on a slow link it needs in full (a part being sent
    is not cut short), and only then releases the writer lease. A preempted
    process does not have those seconds: past the allowance it exits without
    them. Nothing is committed after that (the aborted worker commits nothing);
    the lease stays until it expires, or until the next writer on this machine
    takes the run over at once.
    """
    outcome: list[BaseException | None] = []

    def close() -> None:
        try:
            m.close(timeout=preemption.seconds_left(deadline))
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    closing = threading.Thread(target=close, name="ckptstore-exit-close", daemon=True)
    closing.start()
    closing.join(preemption.seconds_left(deadline))
    if not outcome and m._uploader is not None:
        status = m._uploader.status()
        if status.in_flight is None and not status.pending:
            closing.join(_CLOSE_ALLOWANCE_SECONDS)  # nothing to upload: let it release the lease
    if not outcome:
        raise TimeoutError(
            "the grace period is over, so the process exits without waiting for the upload "
            f"worker to stop; the writer lease of {m._redactor.url} is not released (it expires "
            f"{m._lease.lease_seconds:.0f} s after its last renewal; a writer on this machine "
            "takes the run over at once)."
        )
    if outcome[0] is not None:
        raise outcome[0]


def _drain_at_exit(manager: CheckpointManager) -> None:
    """At interpreter exit, finish the uploads of a manager nobody closed (:mod:`exit_drain`)."""
    ref = weakref.ref(manager)

    def drain() -> None:
        m = ref()
        if m is None or m._closed or m._uploader is None or m._uploader.lost is not None:
            return
        status = m._uploader.status()
        waiting = ([status.in_flight] if status.in_flight else []) + list(status.pending)
        if waiting:
            log.warning(
                "ckptstore: finishing the upload of %s to %s before exit...",
                ", ".join(waiting),
                m._redactor.url,
            )
        try:
            if m._exit_deadline is None:
                m.close()
            else:  # a preempted process must be gone by the end of its grace period
                _close_by(m, m._exit_deadline)
        except Exception as exc:
            left = ", ".join(waiting) or "the last checkpoints"
            message = (
                f"ckptstore: {left} NOT committed to {m._redactor.url} at exit: "
                f"{m._redactor.describe(exc)} They stay staged in {m._staging_dir}; a manager "
                "opened on that staging directory uploads them."
            )
            log.error("%s", message)
            # Loudly, even where logging goes nowhere: this is the last word.
            print(message, file=sys.stderr, flush=True)
        else:
            if waiting:
                log.warning("ckptstore: %s committed to %s", ", ".join(waiting), m._redactor.url)

    exit_drain.register(drain)
