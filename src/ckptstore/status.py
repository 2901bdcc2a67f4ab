"""Where the background work of a manager, callback or exporter stands: ``status()``.

``CheckpointManager.status()``, ``ckptstore.keras.BackupAndRestore.status()``,
``ckptstore.keras.ModelCheckpoint.status()`` and
``ckptstore.saved_model.Exporter.status()`` all return a :class:`Status`: a
frozen snapshot whose ``str()`` is one line for a training log::

    ckptstore s3://b/run: 2 pending (ckpt-8 uploading, 312.4 MB left at 38.2 MB/s);
        last commit ckpt-7 40 s ago; no errors
    ckptstore s3://b/run: up to date; last commit ckpt-7 12 s ago; no errors

(the first is one line, broken here to fit the page).

This module imports neither TensorFlow nor any client library.
"""

from __future__ import annotations

import dataclasses
import time

from ckptstore.progress import size_text

#: roles a :class:`Status` reports
WRITER, READER, LOCAL, CLOSED = "writer", "reader", "local", "closed"

#: the longest error text ``str()`` shows (the field keeps all of it)
_ERROR_CHARS = 160


@dataclasses.dataclass(frozen=True)
class Status:
    """A point-in-time account of uploads, for a log line or a dashboard.

    Example::

        status = manager.status()
        print(status)                      # one line, no credentials
        if status.bytes_left > 10**9:
            log.warning("the link is falling behind: %s", status)

    Attributes:
        url: where the artifacts go, credentials removed (the directory itself in
            local mode).
        role: ``"writer"`` (uploads), ``"reader"`` (restores only: another process
            writes the run, or ``read_only=True``), ``"local"`` (a plain directory, no
            background work) or ``"closed"`` (closed, or a Keras callback outside
            ``fit()``).
        pending: names saved and not committed yet, oldest first: the one uploading
            (if any) first, then those waiting.
        in_flight: the name being uploaded now, or ``None``.
        bytes_left: bytes of ``pending`` not sent yet: the sizes of the staged files,
            less what the upload in flight has sent (a retried attempt counts again).
        rate: bytes per second sent over the last few seconds; ``None`` when nothing
            moved in that time.
        committed: how many artifacts are committed on the remote (checkpoints the
            manager knows of; for callbacks and exporters, commits made by this object).
        last_commit: name of the newest commit; ``None`` when there is none.
        last_commit_time: when it was committed (``time.time()`` seconds). For a
            checkpoint committed before this manager opened, the time it was saved.
        failed: names whose upload failed and that were not committed since (they
            stay staged; ``sync()`` or ``wait()`` raised or will raise the error).
        last_error: the most recent failure, credentials removed: an upload, upkeep
            (retirement, state file, orphans) or the loss of the run to another
            writer, prefixed with what was being done. It is kept after later
            successes, with its time, so a log shows that it happened; compare
            ``last_error_time`` with ``last_commit_time`` to see which came last.
        last_error_time: when ``last_error`` happened (``time.time()`` seconds).
        as_of: when this snapshot was taken (``time.time()`` seconds); ``str()``
            states ages relative to it.
    """

    url: str
    role: str = WRITER
    pending: tuple[str, ...] = ()
    in_flight: str | None = None
    bytes_left: int = 0
    rate: float | None = None
    committed: int = 0
    last_commit: str | None = None
    last_commit_time: float | None = None
    failed: tuple[str, ...] = ()
    last_error: str | None = None
    last_error_time: float | None = None
    as_of: float = dataclasses.field(default_factory=time.time)

    @property
    def is_writer(self) -> bool:
        """Whether the object this came from uploads (and commits) to ``url``."""
        return self.role == WRITER

    @property
    def up_to_date(self) -> bool:
        """Nothing pending and nothing failed: every save is committed."""
        return not self.pending and not self.failed

    def __str__(self) -> str:
        """One line: what is pending, the last commit, the last error.

        Example::

            print(manager.status())
            # ckptstore s3://b/run: up to date; last commit ckpt-5 3 s ago; no errors
        """
        role = "" if self.role == WRITER else f" ({self.role})"
        parts = [self._work()]
        if self.failed:
            parts.append(f"{len(self.failed)} failed ({', '.join(self.failed)})")
        parts.append(self._commit())
        parts.append(self._error())
        return f"ckptstore {self.url}{role}: " + "; ".join(p for p in parts if p)

    def _work(self) -> str:
        if self.pending:
            left = size_text(self.bytes_left)
            speed = f" at {size_text(self.rate)}/s" if self.rate else ""
            doing = f"{self.in_flight} uploading, " if self.in_flight else ""
            return f"{len(self.pending)} pending ({doing}{left} left{speed})"
        if self.role in (READER, LOCAL):
            return ""  # nothing of its own to upload: the commits say it all
        return "up to date" if not self.failed else ""

    def _commit(self) -> str:
        if self.last_commit is None:
            return "nothing committed yet" if self.role != LOCAL else "nothing saved yet"
        what = "last save" if self.role == LOCAL else "last commit"
        return f"{what} {self.last_commit}{_ago(self.last_commit_time, self.as_of)}"

    def _error(self) -> str:
        if self.last_error is None:
            return "no errors" if self.role != LOCAL else ""
        text = " ".join(self.last_error.split())  # one line, whatever the exception said
        if len(text) > _ERROR_CHARS:
            text = text[: _ERROR_CHARS - 1] + "…"
        return f"last error{_ago(self.last_error_time, self.as_of)}: {text}"


def _ago(when: float | None, now: float) -> str:
    """`` 40 s ago``, `` 3 min ago``, `` 2.5 h ago``, `` 3 d ago`` (with its leading space)."""
    if when is None:
        return ""
    seconds = max(0.0, now - when)
    if seconds < 100:
        return f" {seconds:.0f} s ago"
    if seconds < 100 * 60:
        return f" {seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f" {seconds / 3600:.1f} h ago"
    return f" {seconds / 86400:.0f} d ago"


def one_line(text: str) -> str:
    """``text`` on one line (an exception's message may span several)."""
    return " ".join(text.split())


__all__ = ["CLOSED", "LOCAL", "READER", "WRITER", "Status"]
