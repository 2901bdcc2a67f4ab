"""``BackupAndRestore``: Keras's fault-tolerance callback, backed up to a URL and verified.

A drop-in for ``keras.callbacks.BackupAndRestore`` whose ``backup_dir`` is a URL
(``s3://``, ``gs://``, ``gdrive://``, any fsspec protocol) or a path::

    import ckptstore.keras

    backup = ckptstore.keras.BackupAndRestore("s3://bucket/run-1/backup", save_freq=100)
    model.fit(x, y, epochs=10, shuffle=False, callbacks=[backup])
    # killed anywhere? run the same two lines again, in a fresh process on an empty
    # machine: fit() goes on from the batch after the last verified backup.

How it works: the backup is a ``tf.train.Checkpoint`` of the model, its optimizer
and the training position (epoch, and batches done in that epoch), managed by a
:class:`ckptstore.CheckpointManager` on ``backup_dir``. So a backup takes the data
path every checkpoint takes: written to local staging (the only part ``fit()``
waits for), uploaded in the background, verified, and only then committed; a
backup still waiting for the link when a newer one is saved is dropped, the newer
one goes next (``when_behind="skip"``). A kill at any instant leaves the last
committed backup intact on the remote, and a new process restores it from there.

Where it goes beyond Keras's own callback:

* Keras overwrites ``latest.weights.h5`` in place: a kill mid-write can leave
  nothing loadable. Here a backup is a new checkpoint, committed by manifest once
  verified; the previous one is retired only after that.
* With an integer ``save_freq``, Keras records the batch but replays the resumed
  epoch from batch 0, so the batches between the epoch's start and the backup are
  trained twice. Here the resumed epoch *consumes* those batches without training
  on them (the model's ``train_function`` only pulls them from the iterator), and
  training goes on at the batch after the backup. With the same data order
  (``shuffle=False`` on arrays, or a ``tf.data`` pipeline that fit() iterates afresh
  each epoch in an order that does not depend on the process) the resumed run ends
  with exactly the weights and optimizer state (iterations, slots) of a run that was
  never interrupted. Dropout's random state is backed up too.
* What the backup holds was checked against Keras 3 (the one TF 2.21 ships):
  ``tf.train.Checkpoint(model=model, optimizer=model.optimizer)`` saves the weights,
  the non-trainable variables (BatchNormalization's statistics) and the optimizer's
  iterations, learning rate and slots, but not the state of Keras 3's seed generators
  (a Dropout's ``seed_generator_state``): restored without it, the resumed run draws
  other dropout masks and ends elsewhere. So the checkpoint lists every one of
  ``model.variables`` as well. Keras 3 creates an optimizer's slots lazily, so the
  optimizer is built before the restore (TensorFlow's deferred restore would fill
  them later, but then nothing could check them), and the restore must match every
  variable: a backup of another model is an error, not a silent partial restore.

What it needs:

* the model built before ``fit()`` (as Keras's callback needs it), and compiled;
* with an integer ``save_freq``, ``steps_per_execution=1`` (the default): a backup
  taken in the middle of an execution could not be resumed exactly, so anything
  else is refused with the fix.

The resumed epoch's logged metrics (progress bar, ``History``) average over the
batches this process trained; the weights and the optimizer state are exact.

On SIGTERM (``save_before_preemption=True``): a spot VM, a Kubernetes pod or a
batch scheduler sends SIGTERM some seconds before it kills the process. The
callback then backs up at the end of the batch running at the signal (the exact
position: a resumed run still ends bit-exact with an uninterrupted one; a signal
during validation: at the epoch's end; after the last batch: the end of training,
so that the restarted ``fit()`` has nothing left to train), waits until that
backup is committed on the remote (until ``grace_period`` seconds after the
signal, if given: then an ERROR names the commit that stays the restorable one,
and the backup stays staged for a restart on the same machine), and ends the
process as TensorFlow's ``PreemptionCheckpointHandler`` does: ``sys.exit(42)``.
Its SIGTERM handler lives from the end of ``on_train_begin`` (a signal during the
restore ends the process as before: nothing was trained) to the end of ``fit()``:

* A handler installed before ``fit()`` is chained: it is called at each SIGTERM,
  right after the callback has noted it, as Python would have called it. If it
  raises (``sys.exit(0)``, its own exception), that exception ends ``fit()`` in
  place of ``sys.exit(42)``, once the backup is committed. ``SIG_DFL`` (terminate)
  and ``SIG_IGN`` are what ``save_before_preemption=True`` replaces.
* It is put back at the end of ``fit()``, and by an exception out of one of the
  callback's hooks. Keras has no hook for an exception raised elsewhere (another
  callback, the data): then it goes back as soon as the ``fit()`` call is gone
  (when Keras's callback list is freed: at once, unless the traceback is kept, as
  a notebook keeps the last one). Meanwhile the callback's handler sees that
  ``fit()`` is no longer running, and a SIGTERM puts the previous handler back and
  goes to it as it would have (``SIG_DFL``: the process ends by the signal).
* More SIGTERMs while the backup uploads or the process exits (a platform's second
  notice) are chained too and change nothing: the wait keeps its deadline (the
  first signal's), and the process ends with status 42. A program that catches
  that ``SystemExit`` keeps the callback's handler, which then ignores SIGTERM,
  until the next ``fit()`` with a backup callback.
* Under ``MultiWorkerMirroredStrategy`` (every worker runs the callbacks; only the
  chief writes the backup) a SIGTERM is handled on the worker that receives it,
  alone: the cluster-wide agreement on a step to save at is TensorFlow's
  ``PreemptionCheckpointHandler``'s (its coordination service), which Keras's
  ``fit()`` does not use. A worker that is not the chief saves nothing (its copy
  would never be uploaded) and exits with status 42 at the end of the batch. The
  chief backs up and commits as above (the backup holds the weights and the
  optimizer's variables, none of them all-reduced while saving, so the chief's
  save needs no other worker). Either way the workers left block in their next
  collective until TensorFlow reports the lost worker or the platform stops them;
  the run restarts from the chief's last committed backup.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

import keras
import tensorflow as tf

from ckptstore import backends, distribution, preemption
from ckptstore.errors import ConfigurationError, RestoreError
from ckptstore.manager import CheckpointManager
from ckptstore.redaction import Redactor
from ckptstore.status import CLOSED, Status

log = logging.getLogger("ckptstore")

#: The status a preempted fit() exits with: TensorFlow's. Its PreemptionCheckpointHandler
#: completes a TerminationConfig without exit_fn with ``sys.exit(42)`` everywhere but on a
#: GCE VM (``failure_handling._complete_config_for_environment``: BorgTerminationConfig's
#: default ``exit_fn``; on GCE, ``failure_handling_util.gce_exit_fn`` exits 143). Telling GCE
#: apart takes an HTTP request to the metadata server (up to 5 s when there is none), so
#: this is the default config's status, the one Keras 2's BackupAndRestore(save_before_
#: preemption=True) ended with (it ran TensorFlow's handler with the default config), and
#: the one ckptstore's manager under TensorFlow's handler ends with.
PREEMPTION_EXIT_STATUS = 42

#: This process's open backup managers, by (backup_dir, staging_dir): a fit() that
#: raised never reached on_train_end, and its manager still holds the staging
#: directory. The next fit() on the same backup closes it first (its pending backup is
#: uploaded), whether it uses the same callback or a new one (a notebook cell run again).
_OPEN: dict[tuple[str, str | None], CheckpointManager] = {}


class BackupAndRestore(keras.callbacks.Callback):
    """Keras's ``BackupAndRestore``, with the backup on a remote and verified before it counts.

    Example::

        backup = ckptstore.keras.BackupAndRestore(
            "s3://bucket/run-1/backup",
            save_freq=100,                        # every 100 batches (or "epoch")
            storage_options={"profile": "training"},
        )
        model.fit(x, y, epochs=10, shuffle=False, callbacks=[backup])

    Args:
        backup_dir: where the backup lives: a URL or a path, used by this callback
            alone (as in Keras). The remote holds TensorFlow checkpoints
            (``ckpt-N.index``, ``ckpt-N.data-*``) with their manifests, TensorFlow's
            ``checkpoint`` state file and ckptstore's writer lease.
        save_freq: ``"epoch"`` to back up at the end of each epoch, or an integer to
            back up every that many batches (counted across epochs, as Keras counts).
        double_checkpoint: keep the two newest backups committed instead of one (the
            previous one is restored if the newest fails verification).
        delete_checkpoint: delete the backup from the remote at the end of a
            successful ``fit()`` (after the pending upload settles; each backup's
            manifest goes before its data), as Keras deletes its local one. A
            ``fit()`` that raises keeps it, whatever this says.
        storage_options: keyword arguments for the fsspec filesystem (credentials,
            endpoint, ...), as for :class:`ckptstore.CheckpointManager`. Never shown.
        staging_dir: local directory backups are written to before their upload
            (default: one per URL under ``~/.cache/ckptstore/staging``).
        save_before_preemption: on SIGTERM, back up at the end of the running batch,
            wait for that backup's commit, and exit with TensorFlow's preemption status
            (``sys.exit(42)``). ``fit()`` must run in the main thread (signal handlers
            are installed there), with ``steps_per_execution=1``. See the module's
            documentation for the handlers installed before, and for several workers.
        grace_period: with ``save_before_preemption``, seconds between SIGTERM and the
            platform's hard kill (Kubernetes' ``terminationGracePeriodSeconds``, 30 s on
            GCE and Azure spot VMs, 10 s for ``docker stop``): the wait for the commit
            ends then, as under TensorFlow's ``TerminationConfig(grace_period=)``. Give
            a second or two less than the platform's: the process still has to exit.
            ``None`` (default): as long as the upload takes; the platform's kill ends it.

    A ``fit()`` that starts with this callback restores the newest committed backup,
    downloaded and verified, and takes the backup directory over as its writer
    (a process that died minutes ago may still hold the writer lease; if it lives
    on after all, it is fenced and commits nothing more). ``on_train_end`` waits for
    the backup in flight and raises :class:`ckptstore.UploadError` for a backup that
    could not be committed; a failed upload never stops training.

    Raises:
        ConfigurationError: ``backup_dir`` is empty or ``save_freq`` is neither
            ``"epoch"`` nor a positive integer; ``save_before_preemption`` on a platform
            without SIGTERM, or a ``grace_period`` that is not a positive number (or
            without ``save_before_preemption``); at ``fit()``, the model is not built,
            an integer ``save_freq`` or ``save_before_preemption`` meets
            ``steps_per_execution`` > 1, or ``save_before_preemption`` meets a
            ``fit()`` outside the main thread (or another callback that already
            handles SIGTERM in that ``fit()``).
        RestoreError: at ``fit()``, the backup does not match the model, or was taken
            with data that has fewer batches per epoch than this ``fit()`` gets.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        storage_options: Mapping[str, Any] | None = None,
        staging_dir: str | os.PathLike | None = None,
        save_before_preemption: bool = False,
        grace_period: float | None = None,
    ):
        super().__init__()
        if isinstance(backup_dir, os.PathLike):
            backup_dir = os.fspath(backup_dir)
        if not backup_dir or not isinstance(backup_dir, str):
            raise ConfigurationError(
                f"ckptstore.keras.BackupAndRestore needs a backup_dir: a URL such as "
                f"'s3://bucket/run-1/backup' or a path; got {backup_dir!r}."
            )
        self._redactor = Redactor(backup_dir, storage_options)
        backends.check_for_url_typos(backup_dir)
        if save_freq != "epoch" and (
            isinstance(save_freq, bool)
            or not isinstance(save_freq, numbers.Integral)
            or save_freq <= 0
        ):
            raise ConfigurationError(
                f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}) got "
                f"save_freq={save_freq!r}: pass 'epoch' to back up at the end of each epoch, "
                "or a positive integer N to back up every N batches. (Keras's save_freq=False, "
                "for backups on preemption only, is not supported.)"
            )
        save_before_preemption = bool(save_before_preemption)
        if save_before_preemption and _no_sigterm():
            raise ConfigurationError(
                f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}) got "
                f"save_before_preemption=True, and this platform ({sys.platform}) has no "
                "SIGTERM a process can handle"
                + (
                    " (Windows ends a process with TerminateProcess, no signal)"
                    if sys.platform == "win32"
                    else ""
                )
                + ": there is nothing to save before. Leave save_before_preemption=False: "
                "the backups save_freq asks for are what a preempted fit() resumes from."
            )
        if grace_period is not None:
            if not save_before_preemption:
                raise ConfigurationError(
                    f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}) got "
                    f"grace_period={grace_period!r} without save_before_preemption=True: "
                    "it bounds the wait for the backup taken on SIGTERM. Pass "
                    "save_before_preemption=True too, or no grace_period."
                )
            if (
                isinstance(grace_period, bool)
                or not isinstance(grace_period, numbers.Real)
                or not grace_period > 0
            ):
                raise ConfigurationError(
                    f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}) got "
                    f"grace_period={grace_period!r}: pass the seconds between SIGTERM and the "
                    "platform's kill (a positive number), or None to wait for the backup's "
                    "commit as long as it takes."
                )
        self.backup_dir = backup_dir
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.save_before_preemption = save_before_preemption
        self.grace_period = None if grace_period is None else float(grace_period)
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self._storage_options = dict(storage_options or {})
        self._staging_dir = os.fspath(staging_dir) if staging_dir is not None else None
        self._key = (backup_dir, os.path.abspath(self._staging_dir) if self._staging_dir else None)
        self._manager: CheckpointManager | None = None
        self._last_manager: CheckpointManager | None = None  # for status() after fit()
        # The training position, saved with the model: the epoch the backup is in, and
        # how many of its batches were trained (0 at an epoch's end: the next one's start).
        self._epoch_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._batches_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch")
        self._epoch = 0  # the epoch fit() is in
        self._since_backup = 0  # batches trained since the last backup (integer save_freq)
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip in it)
        self._skipper: _BatchSkipper | None = None
        self._watch: _SigtermWatch | None = None  # save_before_preemption, during fit()

    # --- Keras's hooks -----------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        if not model.built:
            raise ConfigurationError(
                f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}) needs the model "
                f"built before fit(), to restore into it: {model.name} is not. Build it first: "
                "give it an Input (keras.Input(shape=...)), call model.build(input_shape), or "
                "call it on a batch of data."
            )
        per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        if self.save_freq != "epoch" and per_execution != 1:
            raise ConfigurationError(
                f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}, "
                f"save_freq={self.save_freq}) needs steps_per_execution=1, and the model was "
                f"compiled with steps_per_execution={per_execution}: a backup every N batches "
                "is resumed exactly at the batch after it, and Keras runs "
                f"{per_execution} batches per call. Compile with steps_per_execution=1, or "
                "back up with save_freq='epoch'."
            )
        if self.save_before_preemption:
            self._check_sigterm_can_be_watched(per_execution)
        self._uninstall_skipper()
        self._close_leftover()
        self._since_backup = 0
        self._resume = None
        self._manager = self._open(model)
        try:
            restored = self._restore(model, per_execution)
        except BaseException:
            # Nothing was trained: give the backup directory up now (lease, staging).
            _OPEN.pop(self._key, None)
            manager, self._manager = self._manager, None
            try:
                manager.close()
            except Exception as close_error:  # the restore's error is the one to see
                log.error(
                    "ckptstore: closing the backup of %s failed too: %s",
                    self._redactor.url,
                    self._redactor.describe(close_error),
                )
            raise
        if restored is None:
            model._initial_epoch = None  # as if no backup had ever been restored into it
        else:
            epoch, batches = restored
            model._initial_epoch = epoch  # what Keras's own callback sets: fit() starts there
            if batches:
                self._resume = (epoch, batches)
        if self.save_before_preemption:
            # Last: a SIGTERM before training starts still ends the process as before.
            self._watch = _SigtermWatch.install(self._redactor.url)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self._resume is not None and self._resume[0] == epoch:
            self._skipper = _BatchSkipper(self.model, self._resume[1])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        with self._watch_ends_on_error():
            skipping = (
                self._resume is not None
                and self._resume[0] == self._epoch
                and batch < self._resume[1]
            )
            if self._watch is not None and self._watch.signalled:
                # While batches go by untrained, the model is the restored backup.
                self._stop_for_preemption(*(self._resume if skipping else (self._epoch, batch + 1)))
            if self.save_freq == "epoch" or skipping:
                return  # skipping: consumed, not trained: the restored backup already has it
            self._since_backup += 1
            if self._since_backup >= self.save_freq:
                self._since_backup = 0
                self._backup(self._epoch, batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with self._watch_ends_on_error():
            if self._resume is not None and self._resume[0] == epoch:
                done = self._resume[1]
                left = self._skipper.left if self._skipper is not None else done
                self._uninstall_skipper()
                self._resume = None
                if left:
                    raise RestoreError(
                        f"The backup at {self._redactor.url} was taken after {done} batches of "
                        f"epoch {epoch + 1}, and this fit() ran out of data {left} batches "
                        "before that point: it resumes the backup only with the data it was "
                        "taken with. Pass the same data and batch_size, or delete the backup "
                        "to start afresh."
                    )
            if self._watch is not None and self._watch.signalled:
                self._stop_for_preemption(epoch + 1, 0)  # a SIGTERM during validation
            if self.save_freq == "epoch":
                self._backup(epoch + 1, 0)

    def on_train_end(self, logs: dict | None = None) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch.end():
            # A SIGTERM after the last batch: training is over, but the process will not
            # live to use it. Back up the end (a restarted fit() has no epoch left to
            # train: it deletes the backup and returns), and keep it.
            self._watch = watch
            with self._watch_ends_on_error():
                epochs = (self.params or {}).get("epochs") or self._epoch + 1
                self._stop_for_preemption(int(epochs), 0)
        self._uninstall_skipper()
        self._resume = None
        if self.model is not None:
            self.model._initial_epoch = None  # a next fit() of this model starts from its args
        manager, self._manager = self._manager, None
        if manager is None:
            return
        _OPEN.pop(self._key, None)
        try:
            if self.delete_checkpoint:
                manager.delete_all()  # the backup in flight settles first; raises what failed
            else:
                manager.sync()
        except BaseException:
            try:
                manager.close()
            except Exception as close_error:  # the first error is the one to see
                log.error(
                    "ckptstore: closing the backup of %s failed too: %s",
                    self._redactor.url,
                    self._redactor.describe(close_error),
                )
            raise
        manager.close()

    def status(self) -> Status:
        """Where the backups' uploads stand: the manager's ``status()`` (one-line ``str()``).

        During ``fit()``, the backup manager's; after it, that manager's last state
        (role ``"closed"``); before the first ``fit()``, an empty one (role
        ``"closed"``).

        Example::

            class LogStatus(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    print(backup.status())
            # ckptstore s3://b/run/backup: up to date; last commit ckpt-4 1 s ago; no errors
        """
        manager = self._manager or self._last_manager
        if manager is None:
            return Status(url=self._redactor.url, role=CLOSED)
        return manager.status()

    # --- the parts -----------------------------------------------------------------------

    def _open(self, model: keras.Model) -> CheckpointManager:
        checkpoint = tf.train.Checkpoint(
            model=model,
            optimizer=model.optimizer,
            epoch=self._epoch_done,
            batch=self._batches_done,
            # Every model variable by position too: tf.train.Checkpoint does not reach
            # some of Keras 3's (a Dropout's seed generator state), and without them
            # the resumed run would draw other dropout masks.
            model_variables=list(model.variables),
        )
        manager = CheckpointManager(
            checkpoint,
            self.backup_dir,
            max_to_keep=2 if self.double_checkpoint else 1,
            staging_dir=self._staging_dir,
            storage_options=self._storage_options,
            # One backup may wait behind the one uploading; a newer one replaces it.
            max_pending_uploads=1,
            when_behind="skip",
            # A fit() started on a backup_dir continues it: the process that wrote it
            # before is presumed gone, even before its lease expires on another machine.
            takeover=True,
        )
        _OPEN[self._key] = manager
        self._last_manager = manager
        return manager

    def _close_leftover(self) -> None:
        """Close the manager a fit() that raised left open on this backup (ours or another's).

        Its backups still waiting are uploaded now, so the restore sees the newest.
        """
        leftover = _OPEN.pop(self._key, None)
        self._manager = None
        if leftover is None:
            return
        try:
            leftover.close()
        except Exception as exc:
            # Not lost: what it could not upload stays staged, and the manager opened
            # next on that staging directory uploads it (and restores from it).
            log.warning(
                "ckptstore: the backup left by an interrupted fit() on %s could not be "
                "committed: %s The manager opened now uploads what is still staged.",
                self._redactor.url,
                self._redactor.describe(exc),
            )

    def _restore(self, model: keras.Model, per_execution: int) -> tuple[int, int] | None:
        """Restore the newest committed backup; return its (epoch, batches done), or None."""
        assert self._manager is not None
        latest = self._manager.latest_checkpoint  # downloaded and verified
        if latest is None:
            self._epoch_done.assign(0)
            self._batches_done.assign(0)
            return None
        if model.optimizer is not None and not model.optimizer.built:
            # Keras 3 creates an optimizer's slots at build time: build them now, so the
            # restore fills them and can check that every one was in the backup.
            model.optimizer.build(model.trainable_variables)
        try:
            self._manager.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise RestoreError(
                f"The backup at {self._redactor.url} ({os.path.basename(latest)}) does not "
                f"match this model and optimizer: {exc} Train the model that wrote it, or "
                "delete the backup (or choose another backup_dir) to start afresh."
            ) from None
        epoch, batches = int(self._epoch_done.numpy()), int(self._batches_done.numpy())
        steps = (self.params or {}).get("steps")
        if batches and per_execution != 1:
            raise ConfigurationError(
                f"The backup at {self._redactor.url} was taken after batch {batches} of epoch "
                f"{epoch + 1}, and resuming there exactly needs steps_per_execution=1; the "
                f"model was compiled with steps_per_execution={per_execution}. Compile it "
                "with steps_per_execution=1 for this fit()."
            )
        if batches and steps and batches > steps:
            raise RestoreError(
                f"The backup at {self._redactor.url} was taken after {batches} batches of "
                f"epoch {epoch + 1}, and this fit() has {steps} batches per epoch: it resumes "
                "the backup only with the data and batch_size it was taken with. Pass those, "
                "or delete the backup to start afresh."
            )
        log.info(
            "ckptstore: restored %s from %s: epoch %d, %d batches of it done",
            os.path.basename(latest),
            self._redactor.url,
            epoch + 1,
            batches,
        )
        return epoch, batches

    def _backup(self, epoch: int, batches: int) -> None:
        """Save the state now; the upload, verification and commit go on in the background."""
        assert self._manager is not None
        self._epoch_done.assign(epoch)
        self._batches_done.assign(batches)
        self._manager.save()

    def _uninstall_skipper(self) -> None:
        if self._skipper is not None:
            self._skipper.uninstall()
            self._skipper = None

    # --- save_before_preemption ------------------------------------------------------------

    def _check_sigterm_can_be_watched(self, per_execution: int) -> None:
        """Refuse, before anything is opened, a fit() in which SIGTERM cannot be handled."""
        shown = (
            f"ckptstore.keras.BackupAndRestore({self._redactor.url!r}, save_before_preemption=True)"
        )
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError(
                f"{shown} handles SIGTERM, and Python installs signal handlers in the main "
                f"thread only: this fit() runs in thread {threading.current_thread().name!r}. "
                "Call fit() from the main thread, or leave save_before_preemption=False (the "
                "backups save_freq asks for are then what a preempted fit() resumes from)."
            )
        if per_execution != 1:
            raise ConfigurationError(
                f"{shown} needs steps_per_execution=1, and the model was compiled with "
                f"steps_per_execution={per_execution}: the backup taken on SIGTERM is resumed "
                "exactly at the batch after it, and Keras runs "
                f"{per_execution} batches per call. Compile with steps_per_execution=1, or "
                "leave save_before_preemption=False."
            )
        current = signal.getsignal(signal.SIGTERM)
        if isinstance(current, _SigtermWatch) and current.watching(sys._getframe()):
            raise ConfigurationError(
                f"{shown}: another callback ({current.url}) already handles SIGTERM in this "
                "fit(), and the first to see the signal ends the process. Pass "
                "save_before_preemption=True to one backup callback only."
            )
        if current is None:
            raise ConfigurationError(
                f"{shown}: SIGTERM has a handler that was not installed from Python (by the "
                "program embedding the interpreter, or a C extension), which Python can "
                "neither call nor put back. Leave save_before_preemption=False here."
            )

    @contextlib.contextmanager
    def _watch_ends_on_error(self) -> Iterator[None]:
        """An exception out of one of our hooks ends fit(): the previous handler goes back."""
        try:
            yield
        except BaseException:
            watch = self._watch
            if watch is not None and not watch.exiting:
                self._watch = None
                watch.restore()
            raise

    def _stop_for_preemption(self, epoch: int, batches: int) -> None:
        """SIGTERM: back up this position, wait for its commit (bounded), end the process."""
        watch, manager = self._watch, self._manager
        assert watch is not None and manager is not None
        role = getattr(manager, "_role", distribution.SINGLE)
        if role.multi_worker and not role.chief:
            log.warning(
                "ckptstore: SIGTERM on worker %s of a %s run (not the chief, which writes the "
                "backups of %s): exiting with status %d without a backup; the run restarts "
                "from the chief's last committed one.",
                role.task_id,
                role.strategy,
                self._redactor.url,
                PREEMPTION_EXIT_STATUS,
            )
        else:
            deadline = None
            if self.grace_period is not None and watch.first_signal is not None:
                deadline = watch.first_signal + self.grace_period
            if batches:
                where = f"after {batches} batches of epoch {epoch + 1}"
            elif epoch >= int((self.params or {}).get("epochs") or epoch + 1):
                where = "at the end of training"
            else:
                where = f"at the end of epoch {epoch}"
            log.warning(
                "ckptstore: SIGTERM: backing up %s %s before the process exits.",
                self._redactor.url,
                where,
            )
            self._epoch_done.assign(epoch)
            self._batches_done.assign(batches)
            # The manager's preemption save: it returns once the backup is committed, or
            # once the deadline has passed (an ERROR then names the commit that stays).
            with preemption.preemption_save(deadline):
                manager.save()
        held = watch.held
        if held is not None:
            # The handler installed before fit() raised at the signal: its exception is
            # how it meant to end things. It comes now that the backup is safe.
            self._watch = None
            watch.restore()
            log.warning(
                "ckptstore: the SIGTERM handler installed before fit() raised %s; raising it "
                "now that the backup is done.",
                type(held).__name__,
            )
            watch.held = None
            raise held
        watch.exiting = True
        log.warning(
            "ckptstore: preempted: exiting with status %d (TensorFlow's).", PREEMPTION_EXIT_STATUS
        )
        raise SystemExit(PREEMPTION_EXIT_STATUS)


def _no_sigterm() -> bool:
    """Whether no other process can stop this one with a SIGTERM it handles."""
    return getattr(signal, "SIGTERM", None) is None or sys.platform == "win32"


def _training_frame(start: FrameType) -> tuple[FrameType, Any]:
    """The frame that runs the training around ``start`` (a hook), and Keras's callback list.

    The first caller that is not a callback's method: Keras's ``fit()`` (or a custom
    loop that calls the callbacks itself), called through ``CallbackList`` (or a
    callback that forwards its hooks). It stays on the stack until training ends.
    """
    callbacks = None
    frame = start
    while frame.f_back is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList) and callbacks is None:
            callbacks = owner
        if not isinstance(owner, keras.callbacks.Callback):
            break
        frame = frame.f_back
    return frame, callbacks


class _SigtermWatch:
    """The SIGTERM handler of one fit() with ``save_before_preemption=True``.

    The signal handler only notes the signal and calls the handler installed
    before (as Python would have called it); the callback acts at its next hook.
    Nothing is logged in the handler: it runs between any two bytecodes of the
    main thread, maybe in the middle of a write to the same stream.
    """

    def __init__(self, url: str, previous: Any, training: FrameType, callbacks: Any):
        self.url = url
        self.previous = previous
        self.signalled = False
        self.first_signal: float | None = None  # time.time() of the first SIGTERM
        self.held: BaseException | None = None  # what the previous handler raised
        self.exiting = False  # the backup is done, SystemExit is on its way
        self._ended = False  # the previous handler is back (or is what SIGTERM gets now)
        self._training = (id(training), training.f_code)
        self._gone = None if callbacks is None else weakref.finalize(callbacks, self._fit_gone)
        if self._gone is not None:
            self._gone.atexit = False  # at exit, nothing is left to put back

    @classmethod
    def install(cls, url: str) -> _SigtermWatch:
        """Install a watch for the fit() this is called from (in an ``on_train_begin``)."""
        hook = sys._getframe(1)
        previous = signal.getsignal(signal.SIGTERM)
        if isinstance(previous, _SigtermWatch):  # left by a fit() that raised, or exited
            previous.restore()
            previous = signal.getsignal(signal.SIGTERM)
        watch = cls(url, previous, *_training_frame(hook))
        signal.signal(signal.SIGTERM, watch)
        return watch

    def watching(self, frame: FrameType | None) -> bool:
        """Whether the fit() this watch is for is running (on the stack of ``frame``)."""
        if self._ended:
            return False
        frame_id, code = self._training
        while frame is not None:
            if id(frame) == frame_id and frame.f_code is code:
                return True
            frame = frame.f_back
        return False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.exiting:  # the backup is committed (or its time is up): nothing changes that
            self._chain(signum, frame, hold=False)
        elif self.watching(frame):
            if not self.signalled:
                self.first_signal = time.time()
                self.signalled = True
            self._chain(signum, frame, hold=True)
        else:  # fit() is over: SIGTERM goes where it went before, as it would have
            self.restore()
            previous = self.previous
            if previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)  # terminated by the signal, as without us
            elif previous != signal.SIG_IGN:
                previous(signum, frame)

    def _chain(self, signum: int, frame: FrameType | None, *, hold: bool) -> None:
        previous = self.previous
        if previous in (signal.SIG_DFL, signal.SIG_IGN):
            return  # save_before_preemption replaces terminating (or ignoring)
        try:
            previous(signum, frame)
        except BaseException as exc:
            if hold and self.held is None:
                self.held = exc

    def end(self) -> bool:
        """At the end of fit(): put the previous handler back, unless a SIGTERM came first.

        Returns whether one did (the handler then stays, to back up and exit).
        """
        self._ended = True  # from here a SIGTERM goes to the previous handler
        if self.signalled:
            self._ended = False
            return True
        self.restore()
        return False

    def restore(self) -> None:
        """Put the previous handler back (if this one is still SIGTERM's)."""
        self._ended = True
        self.exiting = False
        if self._gone is not None:
            self._gone.detach()
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; meanwhile this one hands SIGTERM on
        if signal.getsignal(signal.SIGTERM) is self:
            signal.signal(signal.SIGTERM, self.previous)

    def _fit_gone(self) -> None:
        """Keras's callback list of the fit() was freed: the fit() call is gone."""
        if not self.exiting and not self._ended:
            self.restore()


class _BatchSkipper:
    """Stands in for ``model.train_function`` while the resumed epoch's first batches go by.

    Keras's fit loop calls ``model.train_function(iterator)`` once per step (with
    ``steps_per_execution=1``) and looks the attribute up anew each time. For the
    first ``left`` steps of the resumed epoch this pulls the step's batch from the
    iterator and trains on nothing, so the data stays in step with the uninterrupted
    run and Keras's batch numbers, callbacks and progress bar go on as usual; then
    it puts Keras's function back. Bound to the iterator of the first call: a later
    ``fit()`` (a new iterator) never has its batches skipped.
    """

    def __init__(self, model: keras.Model, left: int):
        self.model = model
        self.left = left
        self.train_function = model.train_function
        self.iterator: Any = None
        model.train_function = self

    def __call__(self, iterator: Any) -> Any:
        if self.left <= 0 or (self.iterator is not None and iterator is not self.iterator):
            self.uninstall()
            return self.train_function(iterator)
        self.iterator = iterator
        next(iterator)  # StopIteration at the data's end: Keras ends the epoch, as it would
        self.left -= 1
        if self.left == 0:
            self.uninstall()
        # What the step would report: the metrics so far (none of this process's yet).
        return self.model.get_metrics_result()

    def uninstall(self) -> None:
        if self.model.train_function is self:
            self.model.train_function = self.train_function
