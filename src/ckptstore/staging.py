"""Local staging: TensorFlow's checkpoint bookkeeping and its ``checkpoint`` state file.

:class:`CheckpointBook` reproduces the bookkeeping of ``tf.train.CheckpointManager``
(TF 2.16-2.21) line for line: the active set ("maybe delete"), the
``keep_checkpoint_every_n_hours`` preservation clock and the state file written
before and after each sweep. It is reproduced rather than inherited because
TensorFlow's class deletes files inside its sweep, and with a remote the
deletion of a staged checkpoint has to wait until its upload is done or
skipped. Sweeping therefore *returns* what to delete; in a plain local
directory the manager deletes it at once, exactly as TensorFlow does.

The state file itself is read and written with TensorFlow's own helpers, so it
is byte-for-byte what TensorFlow writes and reads.

A staging directory may be one the user already had (``staging_dir=`` pointed
at a directory holding their own ``Checkpoint.save()`` output). ckptstore
deletes there only what it wrote itself: the journal ``.ckptstore-staged.json``
names every checkpoint ckptstore staged or downloaded, recorded before the
first byte of it is written, and every deletion in staging checks it.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import logging
import os
import shutil
import threading
import time

from ckptstore.errors import ConfigurationError

log = logging.getLogger("ckptstore")

MIN_TF_VERSION = (2, 16)


def import_tensorflow():
    """Import TensorFlow, or explain how to get a version ckptstore supports."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError(
            "ckptstore needs TensorFlow >= 2.16, which is not installed "
            f"({exc}). Install one: pip install tensorflow (or tensorflow-cpu)."
        ) from None
    parts = tuple(int(p) for p in tf.__version__.split(".")[:2] if p.isdigit())
    if parts and parts < MIN_TF_VERSION:
        raise ImportError(
            f"ckptstore needs TensorFlow >= 2.16; found {tf.__version__}. "
            "Upgrade it: pip install -U tensorflow"
        )
    return tf


tf = import_tensorflow()
from google.protobuf import text_format  # noqa: E402  (ships with TensorFlow)
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState  # noqa: E402


class CheckpointBook:
    """What ``tf.train.CheckpointManager`` remembers about the checkpoints it manages.

    ``active`` maps each managed prefix (oldest first) to its timestamp; it is
    TensorFlow's ``_maybe_delete``. Prefixes are full paths, as TensorFlow keeps them.
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int | None,
        keep_checkpoint_every_n_hours: float | None,
    ):
        self.directory = directory
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.active: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.latest: str | None = None
        self.last_preserved_timestamp = 0.0

    # TensorFlow's __init__, after argument checks.
    def recover(self, state: CheckpointState | None) -> None:
        current_clock = time.time()
        self.active.clear()
        if state is None:
            self.latest = None
            # Set the clock back slightly to avoid race conditions when quickly
            # re-creating a manager (TensorFlow's comment and behaviour).
            self.last_preserved_timestamp = current_clock - 1.0
            return
        self.latest = state.model_checkpoint_path
        self.last_preserved_timestamp = state.last_preserved_timestamp
        if current_clock < self.last_preserved_timestamp:
            # TensorFlow's warning, through TensorFlow's logger, formatted as it formats it.
            tf.get_logger().warning(
                "time.time() returned a value %f seconds behind the last preserved "  # noqa: UP031
                "checkpoint timestamp." % (self.last_preserved_timestamp - current_clock,)
            )
            self.last_preserved_timestamp = current_clock
        all_timestamps = list(state.all_model_checkpoint_timestamps)
        all_paths = list(state.all_model_checkpoint_paths)
        if not all_timestamps:
            all_timestamps = [self.last_preserved_timestamp] * len(all_paths)
        for filename, timestamp in zip(all_paths, all_timestamps):
            timestamp = min(timestamp, current_clock)
            if timestamp > self.last_preserved_timestamp:
                self.active[filename] = timestamp

    # TensorFlow's _record_and_sweep_state, first half.
    def add(self, save_path: str, timestamp: float) -> None:
        if save_path in self.active:
            # An overwritten checkpoint goes to the end of the queue.
            del self.active[save_path]
        self.active[save_path] = timestamp
        self.latest = save_path

    # TensorFlow's _sweep, minus the deleting.
    def sweep(self) -> list[str]:
        """Drop checkpoints beyond ``max_to_keep``; return those to delete (oldest first)."""
        doomed: list[str] = []
        if not self.max_to_keep:
            return doomed
        while len(self.active) > self.max_to_keep:
            filename, timestamp = self.active.popitem(last=False)
            if self.keep_checkpoint_every_n_hours and (
                timestamp - self.keep_checkpoint_every_n_hours * 3600.0
                >= self.last_preserved_timestamp
            ):
                self.last_preserved_timestamp = timestamp
                continue
            doomed.append(filename)
        return doomed

    def forget(self, save_path: str) -> None:
        """Remove a checkpoint that will never exist (an upload skipped as superseded)."""
        self.active.pop(save_path, None)
        if self.latest == save_path:
            self.latest = next(reversed(self.active), None) if self.active else None

    # TensorFlow's _record_state.
    def write_state_file(self) -> None:
        if not self.active or self.latest is None:
            return
        filenames, timestamps = zip(*self.active.items())
        tf.__internal__.train.update_checkpoint_state(
            self.directory,
            model_checkpoint_path=self.latest,
            all_model_checkpoint_paths=filenames,
            all_model_checkpoint_timestamps=timestamps,
            last_preserved_timestamp=self.last_preserved_timestamp,
            save_relative_paths=True,
        )


def read_state_file(directory: str) -> CheckpointState | None:
    """TensorFlow's ``get_checkpoint_state``: absolute-ised paths, or ``None``."""
    return tf.train.get_checkpoint_state(directory)


def remove_checkpoint(prefix: str) -> None:
    """TensorFlow's sweep of one checkpoint, for a plain local directory (local mode).

    TensorFlow's ``_delete_file_if_exists`` on the same two patterns, through
    TensorFlow's file API (so exactly the same files go), with its warning,
    through its logger, when a file vanishes between listing and deleting.
    Staging directories use :func:`delete_checkpoint_files` instead.
    """
    for filespec in (prefix + ".index", prefix + ".data-?????-of-?????"):
        for pathname in tf.io.gfile.glob(filespec):
            try:
                tf.io.gfile.remove(pathname)
            except tf.errors.NotFoundError:
                tf.get_logger().warning(
                    "Hit NotFoundError when deleting '%s', possibly because another "
                    "process/thread is also deleting/moving the same file",
                    pathname,
                )


# --- what ckptstore staged: the only files it deletes in a staging directory ---------------

STAGED_JOURNAL = ".ckptstore-staged.json"
_JOURNAL_FORMAT = "ckptstore.staged"
_journal_lock = threading.Lock()  # read-modify-write of a journal, across this process's threads


def _journal_path(staging_dir: str) -> str:
    return os.path.join(staging_dir, STAGED_JOURNAL)


def _read_journal(staging_dir: str) -> list[str]:
    try:
        with open(_journal_path(staging_dir), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        # Unreadable: treat nothing as ckptstore's. That only keeps files.
        log.warning("Ignoring an unreadable %s in %s: %s", STAGED_JOURNAL, staging_dir, exc)
        return []
    if not isinstance(data, dict) or data.get("format") != _JOURNAL_FORMAT:
        names = None
    else:
        names = data.get("checkpoints")
    if not isinstance(names, list):
        log.warning("Ignoring %s in %s: not a ckptstore journal", STAGED_JOURNAL, staging_dir)
        return []
    return [n for n in names if isinstance(n, str)]


def _write_journal(staging_dir: str, names: list[str]) -> None:
    """Replace the journal atomically (temporary file, then rename).

    Not fsynced: after a power cut the journal may miss its newest names, and a
    name missing from it only keeps that checkpoint's files (the safe side).
    """
    path = _journal_path(staging_dir)
    temp = f"{path}.tmp-{os.getpid()}"
    text = json.dumps({"format": _JOURNAL_FORMAT, "format_version": 1, "checkpoints": names})
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)


def record_staged(staging_dir: str, names: list[str]) -> None:
    """Note that ckptstore is about to write these checkpoints into ``staging_dir``.

    Call before the first byte of them is written (TensorFlow's write, a
    download): a crash in between then leaves nothing ckptstore would not
    recognise as its own. One small file write, and none when they are listed already.
    """
    if not names:
        return
    with _journal_lock:
        staged = _read_journal(staging_dir)
        new = [n for n in dict.fromkeys(names) if n not in staged]
        if new:
            _write_journal(staging_dir, staged + new)


def staged_names(staging_dir: str) -> list[str]:
    """The checkpoints ckptstore staged in ``staging_dir`` and has not deleted (oldest first)."""
    with _journal_lock:
        return _read_journal(staging_dir)


def delete_checkpoint_files(prefix: str) -> bool:
    """Delete a staged checkpoint's files (index, then data shards), if ckptstore staged it.

    A checkpoint the journal does not name is someone else's (the user's own
    ``Checkpoint.save()`` in a ``staging_dir`` they chose): its files stay and
    this returns ``False``.
    """
    staging_dir, name = os.path.split(prefix)
    if name not in staged_names(staging_dir):
        log.info("Keeping %s in %s: ckptstore did not write it", name, staging_dir)
        return False
    for path in [prefix + ".index", *glob.glob(glob.escape(prefix) + ".data-?????-of-?????")]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    with _journal_lock:
        staged = _read_journal(staging_dir)
        if name in staged:
            staged.remove(name)
            _write_journal(staging_dir, staged)
    return True


def remove_partial_writes(staging_dir: str) -> list[str]:
    """Delete what a killed TensorFlow write of ckptstore's left: ``<prefix>_temp/part-*``.

    TensorFlow writes shards into ``<prefix>_temp/`` and moves them into place at
    the end; a process killed in between leaves the directory behind, and no
    TensorFlow code ever removes it. Only directories of checkpoints ckptstore
    staged, holding nothing but such shards, are removed.
    """
    staged = set(staged_names(staging_dir))
    removed = []
    for name in os.listdir(staging_dir):
        path = os.path.join(staging_dir, name)
        if not (name.endswith("_temp") and name[: -len("_temp")] in staged):
            continue
        if os.path.isdir(path) and all(entry.startswith("part-") for entry in os.listdir(path)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def state_text(names: list[str], timestamps: list[float], last_preserved_timestamp: float) -> str:
    """The state file TensorFlow would write for ``names`` (relative, oldest first)."""
    proto = CheckpointState(
        model_checkpoint_path=names[-1],
        all_model_checkpoint_paths=names,
        all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=last_preserved_timestamp,
    )
    return text_format.MessageToString(proto)


def parse_state_text(text: str) -> CheckpointState | None:
    """Parse a state file's text; ``None`` (with a warning) when it is not one."""
    proto = CheckpointState()
    try:
        text_format.Merge(text, proto)
    except text_format.ParseError as exc:
        log.warning("Ignoring an unreadable checkpoint state file: %s", exc)
        return None
    return proto if proto.model_checkpoint_path else None


def prepare_staging_dir(path: str) -> str:
    """Create ``path`` if needed and prove it is writable, or say how to fix it."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".ckptstore-write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigurationError(
            f"The staging directory {path!r} is not writable ({exc.strerror or exc}). "
            "Pass staging_dir= a writable local directory with room for a few checkpoints."
        ) from None
    return path


def default_staging_dir(shown_url: str) -> str:
    """A per-URL directory under the user's cache, stable across restarts.

    Stable so that a manager restarted on the same machine finds the staged
    checkpoints its predecessor did not finish uploading.
    """
    import hashlib
    import re

    base = os.environ.get("CKPTSTORE_STAGING_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "ckptstore",
        "staging",
    )
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", shown_url)[-60:].strip("_")
    digest = hashlib.sha256(shown_url.encode("utf-8")).hexdigest()[:12]
    return os.path.join(base, f"{slug}-{digest}")


def private_staging_dir(shown_url: str) -> str:
    """A fresh directory for a manager that only reads, beside the default staging base.

    Used when another live manager on this machine owns the run's staging
    directory: the reader downloads here and never touches the owner's files.
    """
    import tempfile

    base = os.path.dirname(default_staging_dir(shown_url))
    os.makedirs(base, exist_ok=True)
    slug = os.path.basename(default_staging_dir(shown_url))
    return tempfile.mkdtemp(prefix=f"{slug}-reader-", dir=base)
