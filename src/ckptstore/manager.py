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

import atexit
import copy
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ckptstore import backends, mounts, restore, staging
from ckptstore.errors import ConfigurationError
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy
from ckptstore.staging import tf
from ckptstore.uploader import BookSnapshot, Uploader, UploadRequest, UploadStatus, WhenBehind

log = logging.getLogger("ckptstore")


def _evaluate(value: Any) -> Any:
    """The numpy value of a variable or tensor (eager mode), as TensorFlow's manager reads it."""
    return value.numpy()


class CheckpointManager:
    """Manages checkpoints like ``tf.train.CheckpointManager``, on any fsspec remote.

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
            default 8 MiB, parts go in parallel), and per chunk of a resumable upload
            (GCS; rounded down to 256 KiB; default 50 MiB, chunks go one after
            another). Parts and chunks stream from the staged file: memory does not
            grow with this size.
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
    ):
        # TensorFlow's checks and attributes first, in TensorFlow's order.
        self._checkpoint = checkpoint
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
        self._uploader: Uploader | None = None
        self._remote: Remote | None = None
        self._restorable: str | None = None  # verified local prefix behind latest_checkpoint
        self._restorable_for: str | None = None  # the book's latest it was resolved for
        self._closed = False
        if max_pending_uploads < 1:
            raise ConfigurationError("max_pending_uploads must be at least 1")

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

        backend, root = backends.resolve(
            directory if backends.is_remote_url(directory) else os.path.abspath(directory),
            storage_options,
        )
        backend.concurrency = upload_concurrency
        if upload_part_size is not None:
            backend.part_size = upload_part_size
        self._remote = Remote(backend, root, self._redactor.url)
        self._staging_dir = staging.prepare_staging_dir(
            staging_dir or staging.default_staging_dir(self._redactor.url)
        )
        for leftover in staging.remove_partial_writes(self._staging_dir):
            log.info("Removed %s, a write interrupted by a crash", leftover)
        plan = restore.plan_resume(self._remote, self._staging_dir, self._retry, self._redactor)
        self._book = staging.CheckpointBook(
            self._staging_dir, max_to_keep, keep_checkpoint_every_n_hours
        )
        self._book.recover(plan.state)
        self._book.write_state_file()
        self._uploader = Uploader(
            self._remote,
            self._staging_dir,
            snapshot=self._snapshot,
            committed=plan.committed,
            redactor=self._redactor,
            retry=self._retry,
            max_pending=max_pending_uploads,
            when_behind=WhenBehind(when_behind),
            concurrency=upload_concurrency,
            extra_versions={"tensorflow": tf.__version__},
        )
        self._uploader.submit(None, retired=plan.retired)
        for request in plan.to_upload:
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
            latest = self._book.latest
            if self._remote is None or latest is None:
                return latest
            if self._restorable is not None and self._restorable_for == latest:
                return self._restorable
            candidates = [os.path.basename(p) for p in reversed(self._book.active)]
            if os.path.basename(latest) not in candidates:
                candidates.insert(0, os.path.basename(latest))
            committed = self._uploader.committed() if self._uploader else {}
            preserved = sorted(
                (n for n in committed if n not in candidates),
                key=lambda n: committed[n].timestamp,
                reverse=True,
            )
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

        if not tf.executing_eagerly():
            raise ConfigurationError(
                "ckptstore.CheckpointManager.save() needs eager execution (TensorFlow 2's "
                "default); call it outside tf.function and tf.compat.v1 sessions."
            )
        save_counter = self._checkpoint.save_counter
        save_counter.assign_add(1)
        if checkpoint_number is None:
            checkpoint_number = save_counter
        if not isinstance(checkpoint_number, (int, np.integer)):
            checkpoint_number = int(_evaluate(checkpoint_number))
        prefix = "%s-%d" % (  # noqa: UP031  (TensorFlow's naming, %d of a numpy int)
            os.path.join(self._staging_dir, self._checkpoint_name),
            checkpoint_number,
        )
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
        return self._checkpoint.write(prefix, options=options)

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
            log.info("Customized initialization is done through the passed `init_fn`.")
        return None

    def sync(self) -> None:
        """Wait for pending writes and uploads; raise :class:`UploadError` if any failed.

        After it returns, every checkpoint saved so far (and not skipped as
        superseded) is verified and committed on the remote.
        """
        if self._checkpoint:
            self._checkpoint.sync()
        if self._uploader is not None:
            self._uploader.wait()
            self._uploader.raise_failures()

    # --- ckptstore's additions ---------------------------------------------------------

    @property
    def staging_dir(self) -> str:
        """The local directory TensorFlow writes into (``directory`` itself in local mode)."""
        return self._staging_dir

    def upload_status(self) -> UploadStatus | None:
        """Committed, pending, failed and skipped uploads; ``None`` in local mode."""
        return self._uploader.status() if self._uploader else None

    def close(self) -> None:
        """Finish every pending upload, stop the worker, and raise what failed."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._closed = True
            if self._uploader is not None:
                self._uploader.close(wait=False)

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
                    staging.delete_checkpoint_files(prefix)
            else:
                request = UploadRequest(os.path.basename(save_path), number, step, timestamp)
                dropped = self._uploader.submit(request, [os.path.basename(p) for p in doomed])
                for name in dropped:
                    self._book.forget(os.path.join(self._staging_dir, name))
                self._restorable = None
            self._book.write_state_file()

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


def _drain_at_exit(manager: CheckpointManager) -> None:
    """At interpreter exit, finish the uploads of a manager nobody closed.

    The worker is a daemon thread (it must never keep a crashed script alive),
    so without this a script that ends right after its last ``save()`` would
    exit before that checkpoint reached the remote.
    """
    ref = weakref.ref(manager)

    def drain() -> None:
        m = ref()
        if m is None or m._closed or m._uploader is None:
            return
        status = m._uploader.status()
        if status.pending or status.in_flight:
            log.warning(
                "ckptstore: finishing %d upload(s) before exit...",
                len(status.pending) + (1 if status.in_flight else 0),
            )
        try:
            m.close()
        except Exception as exc:
            log.error("ckptstore: %s", m._redactor.describe(exc))

    atexit.register(drain)
