"""``ModelCheckpoint``: Keras's callback, with the file at a URL and verified before it counts.

Keras's own callback is reused whole (its filepath rules, its ``{epoch:02d}`` and
metric fields, ``save_best_only``, ``mode``, ``save_freq``, ...); only where the
file is written changes. Each save is written locally by Keras, then uploaded,
verified and committed in the background, so ``fit()`` waits for the local
write only::

    import ckptstore.keras

    model.fit(
        x, y, validation_data=(vx, vy), epochs=20,
        callbacks=[ckptstore.keras.ModelCheckpoint(
            "s3://bucket/run-1/best.keras", save_best_only=True
        )],
    )                      # returns once every save is committed, or raises UploadError
    best = ckptstore.keras.load_model("s3://bucket/run-1/best.keras")

Beyond Keras:

* ``on_train_end`` waits for every upload and raises :class:`ckptstore.UploadError`
  naming each save that was not committed. A failed upload never stops training.
* A save still waiting for its upload is dropped when a newer save of the same
  file comes (``best.keras`` improving faster than the link): the newer one goes next.
* ``save_best_only`` survives a restart. The committed file's manifest keeps the
  monitor, its direction, the best value and the epoch; a new callback on the
  same filepath reads it when ``fit()`` begins, so a resumed run never replaces a
  better model with a worse one (Keras's own callback starts from nothing:
  tf-keras#430). With format fields in the file name (``best-{epoch:02d}.keras``)
  the best of the committed files matching the pattern is the bar, so the
  resumed run adds a file only when it beats all of them.
* ``save_best_only`` with an integer ``save_freq`` works (Keras 3.15's callback
  compares against a missing monitor function at the second batch-level save).
* A format field naming a metric that is not logged is an error naming the
  field, the metrics that are, and the URL.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
from collections.abc import Mapping
from typing import Any, NamedTuple

import keras
from keras.src.utils import io_utils  # what Keras's callback prints with

from ckptstore import backends, targets
from ckptstore.errors import ConfigurationError, RemoteUnavailableError, UploadError
from ckptstore.keras import saving
from ckptstore.manifest import Manifest
from ckptstore.publisher import Account, PublishHandle, read_committed
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.status import Status

log = logging.getLogger("ckptstore")

#: who wrote a manifest's ``metadata`` (a ``save_model`` file carries none)
CALLBACK = "ckptstore.keras.ModelCheckpoint"
#: the methods of Keras's callback this class overrides or calls (private to Keras:
#: checked at construction, so a Keras that renamed them fails with a clear message)
_KERAS_HOOKS = ("_save_model", "_should_save_model", "_get_file_path", "_set_monitor_op")


class FormatFieldError(ConfigurationError, KeyError):
    """A field of ``filepath`` (``{val_loss:.3f}``) has no value in the logs.

    A ``KeyError``, as Keras raises, and a :class:`ckptstore.ConfigurationError`.
    """

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class _Best(NamedTuple):
    """A best value kept in a committed file's manifest."""

    mode: str  # "min" or "max"
    value: float
    name: str
    epoch: int | None


def _split(url: str) -> tuple[str, str]:
    """``(directory, file name)`` of a URL or a local path."""
    if "://" in url:
        head, _, name = url.rpartition("/")
        return head, name
    return os.path.split(os.path.abspath(url))


def _fields(text: str) -> list[str]:
    """The format fields of ``text`` (``"m-{epoch:02d}.keras"`` -> ``["epoch"]``)."""
    return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]


def _name_pattern(template: str) -> re.Pattern[str]:
    """A regular expression matching the file names ``template`` formats to."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(".+?")
    return re.compile("".join(parts))


def _scalar(value: Any) -> float | None:
    """``value`` as a finite Python float, or ``None`` (a tensor, NaN, missing)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's ``ModelCheckpoint`` whose ``filepath`` is a URL; every save verified, committed.

    Args:
        filepath: URL or path of the file, with Keras's format fields:
            ``s3://bucket/run/model-{epoch:02d}-{val_loss:.3f}.keras``, or a
            ``.weights.h5`` name with ``save_weights_only=True``.
        monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
            initial_value_threshold: Keras's, with Keras's meaning. With
            ``save_best_only=True`` the best value committed by an earlier run
            on the same filepath counts too (the stricter of it and
            ``initial_value_threshold``).
        storage_options: keyword arguments for the fsspec filesystem
            (credentials, endpoint, ...); never logged, shown or written.
        staging_dir: local directory Keras writes each file into before its
            upload (default: beside ``$CKPTSTORE_STAGING_DIR`` or
            ``~/.cache/ckptstore/staging``). Each local copy is removed once
            committed, kept if its upload failed.

    Raises:
        ConfigurationError: a filepath without the extension Keras requires, or
            with unbalanced braces; the URL is named, credentials removed.

    Example::

        checkpoint = ckptstore.keras.ModelCheckpoint(
            "gs://bucket/run-1/weights-{epoch:02d}.weights.h5",
            save_weights_only=True,
        )
        model.fit(x, y, epochs=5, callbacks=[checkpoint])
        ckptstore.keras.saving.load_weights(model, "gs://bucket/run-1/weights-05.weights.h5")
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        staging_dir: str | os.PathLike | None = None,
    ):
        missing = [h for h in _KERAS_HOOKS if not hasattr(keras.callbacks.ModelCheckpoint, h)]
        if missing:
            raise ImportError(
                f"ckptstore.keras.ModelCheckpoint builds on Keras 3's ModelCheckpoint, which in "
                f"Keras {keras.__version__} has no {', '.join(missing)}. Install the Keras your "
                "TensorFlow ships (TF 2.16 to 2.21: Keras 3), or report this to ckptstore."
            )
        text = os.fspath(filepath)
        self._storage_options = dict(storage_options or {})
        self._redactor = Redactor(text, self._storage_options)  # scrubs URL and options
        self._shown = self._redactor.url
        try:
            fields = _fields(text)
        except ValueError as exc:  # "{epoch" and friends
            raise ConfigurationError(
                f"ModelCheckpoint: {self._shown} is not a valid format string ({exc}); write "
                "fields as {epoch:02d} or {val_loss:.3f}, and a literal brace as {{ or }}."
            ) from None
        # Ours first: Keras's own check would show the URL with its credentials.
        saving.check_filepath(
            text, self._shown, weights_only=bool(save_weights_only), caller="ModelCheckpoint"
        )
        # "s3:/bucket" and friends, now rather than at the end of the first epoch.
        backends.check_for_url_typos(text)
        super().__init__(
            text,
            monitor=monitor,
            verbose=verbose,
            save_best_only=save_best_only,
            save_weights_only=save_weights_only,
            mode=mode,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        self.staging_dir = staging_dir
        self._has_fields = bool(fields)
        self._handles: list[PublishHandle] = []
        self._remotes: dict[str, Remote] = {}  # directory -> remote, opened once each
        self._restored: list[_Best] = []  # best values read at on_train_begin, not merged yet
        self._account = Account(self._shown)

    def status(self) -> Status:
        """Where this callback's uploads stand; ``str()`` of it is one line for a log.

        Files saved and not committed yet (by file name, the one uploading
        first), bytes left, the recent rate, the last file this callback
        committed and when, and the last error, credentials removed. A save
        superseded by a newer one of the same file before it went up is no
        longer pending. The last error stays after later commits, with its time.

        Example::

            checkpoint = ckptstore.keras.ModelCheckpoint("s3://b/run/model-{epoch:02d}.keras")
            model.fit(x, y, epochs=3, callbacks=[checkpoint])
            print(checkpoint.status())
            # ckptstore s3://b/run/model-{epoch:02d}.keras: up to date; last commit
            #     model-03.keras 0 s ago; no errors                        (one line)
        """
        return self._account.status()

    # --- Keras's hooks ---------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if self.save_best_only:
            self._restored = self._committed_best()
            if self.monitor_op is not None:  # a second fit() with this callback
                self._merge_restored()

    def on_train_end(self, logs: dict | None = None) -> None:
        """Wait until every save of this ``fit()`` is committed; raise what failed."""
        super().on_train_end(logs)
        handles, self._handles = self._handles, []
        failed: list[tuple[str, UploadError]] = []
        for handle in handles:
            try:
                handle.wait()
            except UploadError as exc:
                failed.append((handle.url, exc))
        if failed:
            urls = list(dict.fromkeys(url for url, _ in failed))  # in order, each once
            raise UploadError(
                f"ModelCheckpoint: {len(failed)} of {len(handles)} save(s) were not "
                f"committed ({', '.join(urls)}). {failed[0][1]}",
                dict(failed),  # the last failure of each URL
            )

    def _set_monitor_op(self) -> None:
        super()._set_monitor_op()
        # The direction ("auto" resolved) is known only now: compare the restored best.
        self._merge_restored()

    def _get_file_path(self, epoch: int, batch: int | None, logs: dict | None) -> str:
        """Keras's formatting, with an error that says which field has no value."""
        values = dict(logs or {})
        values["epoch"] = epoch + 1
        if batch is not None and "batch" not in values:
            values["batch"] = batch + 1
        try:
            return self.filepath.format(**values)
        except KeyError as exc:
            field = exc.args[0]
            hint = (
                " {batch} has a value only with an integer save_freq."
                if field == "batch"
                else " Validation metrics (val_...) are logged only when fit() gets "
                "validation data, and only in the epochs it validates."
                if str(field).startswith("val_")
                else ""
            )
            raise FormatFieldError(
                f"ModelCheckpoint: the field {{{field}}} in {self._shown} names no logged "
                f"value; at this save there are: {', '.join(sorted(values))}.{hint} Use one "
                "of those, or log the metric (compile(metrics=[...]))."
            ) from None
        except (IndexError, ValueError) as exc:
            raise ConfigurationError(
                f"ModelCheckpoint: cannot format {self._shown} ({exc}); fields must be named "
                "({epoch:02d}, {val_loss:.3f}) with a format that suits a number."
            ) from None

    def _save_model(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        """Keras's decision, then a local write and a background upload of the file."""
        logs = logs or {}
        if self.save_best_only and self.monitor_op is None:
            # Keras sets it at the first epoch's end; a batch-level save before that
            # would compare against nothing (and fail at the second such save).
            self._set_monitor_op()
        url = self._get_file_path(epoch, batch, logs)
        target = self._target(url)
        shown = target[1].url
        # Keras prints this path when verbose: the URL without credentials.
        if not self._should_save_model(epoch, batch, logs, shown):
            return
        value = _scalar(logs.get(self.monitor))
        metadata: dict[str, Any] = {
            "callback": CALLBACK,
            "monitor": self.monitor,
            "mode": self._direction(),
            "value": value,
            "save_best_only": bool(self.save_best_only),
            "epoch": epoch + 1,
            "batch": None if batch is None else batch + 1,
        }
        if self.save_best_only and value is not None:
            metadata["best"] = value
        handle = saving.publish_model_file(
            self.model,
            url,
            weights_only=self.save_weights_only,
            staging_dir=self.staging_dir,
            metadata=metadata,
            number=epoch + 1,
            supersedable=True,  # a newer save of the same file goes up instead
            target=target,
            account=self._account,
        )
        self._handles.append(handle)
        if self.verbose > 0:
            io_utils.print_msg(
                f"\nEpoch {epoch + 1}: wrote {shown} locally; it uploads in the background"
            )

    # --- the remote ---------------------------------------------------------------------

    def _target(self, url: str) -> saving.Target:
        """``(remote, redactor, name)`` of one formatted filepath."""
        head, name = _split(url)
        return self._remote_for(head), Redactor(url, self._storage_options), name

    def _remote_for(self, head: str) -> Remote:
        """The remote of one directory, opened once (on Drive, opening asks the service)."""
        remote = self._remotes.get(head)
        if remote is None:
            remote = self._remotes[head] = targets.open_dir(head, self._storage_options)[0]
        return remote

    def _direction(self) -> str | None:
        if self.monitor_op is keras.ops.less:
            return "min"
        if self.monitor_op is keras.ops.greater:
            return "max"
        return None

    def _committed_best(self) -> list[_Best]:
        """The best values earlier runs committed on this filepath (read, never written).

        Raises:
            RemoteUnavailableError: the remote cannot be read. Training would then
                risk replacing a better model with a worse one, so it does not start.
        """
        head, pattern = _split(self.filepath)
        if _fields(head):
            log.warning(
                "ModelCheckpoint: %s has format fields in its directory; the best %s of "
                "earlier runs is not looked up there, so a resumed fit() starts from no best.",
                self._shown,
                self.monitor,
            )
            return []
        remote = self._remote_for(head)
        try:
            manifests = self._read_manifests(remote, pattern)
        except Exception as exc:
            raise RemoteUnavailableError(
                f"ModelCheckpoint: cannot read the best {self.monitor} committed at "
                f"{self._shown} ({self._redactor.describe(exc)}). Without "
                "it a resumed fit() could replace a better model with a worse one, so it does "
                "not start; check the network and the credentials, and fit() again."
            ) from None
        found = []
        for name, manifest in manifests.items():
            best = self._best_in(manifest, name)
            if best is not None:
                found.append(best)
        return found

    def _read_manifests(self, remote: Remote, pattern: str) -> dict[str, Manifest]:
        def call(what: str, operation: Any) -> Any:
            return saving.call_retrying(remote, self._redactor, f"{what} ({remote.url})", operation)

        if not self._has_fields:
            manifest = read_committed(remote, pattern, call)
            return {pattern: manifest} if manifest is not None else {}
        matches = _name_pattern(pattern)
        names = call("list", remote.list_names)
        committed = [n for n in remote.committed_names(names) if matches.fullmatch(n)]
        read = call("read the manifests", lambda: remote.read_manifests(committed))
        return {n: m for n, m in read.items() if isinstance(m, Manifest)}

    def _best_in(self, manifest: Manifest, name: str) -> _Best | None:
        meta = manifest.metadata
        if meta.get("callback") != CALLBACK or not meta.get("save_best_only"):
            return None  # a save_model file, or a run without save_best_only: no bar
        value = _scalar(meta.get("best"))
        if meta.get("monitor") != self.monitor:
            log.warning(
                "ModelCheckpoint: %s was kept as the best %s, not %s; its value is not a bar "
                "for this run, so a new save may replace it.",
                name,
                meta.get("monitor"),
                self.monitor,
            )
            return None
        if value is None or meta.get("mode") not in ("min", "max"):
            return None
        epoch = meta.get("epoch")
        return _Best(meta["mode"], value, name, epoch if isinstance(epoch, int) else None)

    def _merge_restored(self) -> None:
        """Make the best committed value the bar, where it is stricter than the current one."""
        direction = self._direction()
        if direction is None:
            return
        restored, self._restored = self._restored, []
        if not restored:
            return
        same = [b for b in restored if b.mode == direction]
        if len(same) < len(restored):
            log.warning(
                "ModelCheckpoint: ignoring the best %s committed with mode=%s at %s; this run "
                "looks for the %s.",
                self.monitor,
                "max" if direction == "min" else "min",
                self._shown,
                "minimum" if direction == "min" else "maximum",
            )
        if not same:
            return
        pick = min if direction == "min" else max
        best = pick(same, key=lambda b: b.value)
        current = _scalar(self.best)
        if current is not None and pick(current, best.value) == current:
            return  # initial_value_threshold (or this callback's own best) is stricter
        self.best = best.value
        log.info(
            "ModelCheckpoint: the best %s so far is %.5g (%s, epoch %s); %s is saved again only "
            "when a model beats it",
            self.monitor,
            best.value,
            best.name,
            best.epoch,
            self._shown,
        )
