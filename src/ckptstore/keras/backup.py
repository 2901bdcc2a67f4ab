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
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from ckptstore import backends
from ckptstore.errors import ConfigurationError, RestoreError
from ckptstore.manager import CheckpointManager
from ckptstore.redaction import Redactor

log = logging.getLogger("ckptstore")

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

    A ``fit()`` that starts with this callback restores the newest committed backup,
    downloaded and verified, and takes the backup directory over as its writer
    (a process that died minutes ago may still hold the writer lease; if it lives
    on after all, it is fenced and commits nothing more). ``on_train_end`` waits for
    the backup in flight and raises :class:`ckptstore.UploadError` for a backup that
    could not be committed; a failed upload never stops training.

    Raises:
        ConfigurationError: ``backup_dir`` is empty or ``save_freq`` is neither
            ``"epoch"`` nor a positive integer; at ``fit()``, the model is not built, or
            an integer ``save_freq`` meets ``steps_per_execution`` > 1.
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
        self.backup_dir = backup_dir
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self._storage_options = dict(storage_options or {})
        self._staging_dir = os.fspath(staging_dir) if staging_dir is not None else None
        self._key = (backup_dir, os.path.abspath(self._staging_dir) if self._staging_dir else None)
        self._manager: CheckpointManager | None = None
        # The training position, saved with the model: the epoch the backup is in, and
        # how many of its batches were trained (0 at an epoch's end: the next one's start).
        self._epoch_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._batches_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch")
        self._epoch = 0  # the epoch fit() is in
        self._since_backup = 0  # batches trained since the last backup (integer save_freq)
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip in it)
        self._skipper: _BatchSkipper | None = None

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
            return
        epoch, batches = restored
        model._initial_epoch = epoch  # what Keras's own callback sets: fit() starts there
        if batches:
            self._resume = (epoch, batches)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self._resume is not None and self._resume[0] == epoch:
            self._skipper = _BatchSkipper(self.model, self._resume[1])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.save_freq == "epoch":
            return
        if self._resume is not None and self._resume[0] == self._epoch and batch < self._resume[1]:
            return  # consumed, not trained: the restored backup already has it
        self._since_backup += 1
        if self._since_backup >= self.save_freq:
            self._since_backup = 0
            self._backup(self._epoch, batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._resume is not None and self._resume[0] == epoch:
            done = self._resume[1]
            left = self._skipper.left if self._skipper is not None else done
            self._uninstall_skipper()
            self._resume = None
            if left:
                raise RestoreError(
                    f"The backup at {self._redactor.url} was taken after {done} batches of "
                    f"epoch {epoch + 1}, and this fit() ran out of data {left} batches before "
                    "that point: it resumes the backup only with the data it was taken with. "
                    "Pass the same data and batch_size, or delete the backup to start afresh."
                )
        if self.save_freq == "epoch":
            self._backup(epoch + 1, 0)

    def on_train_end(self, logs: dict | None = None) -> None:
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
