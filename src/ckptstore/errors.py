"""The exceptions ckptstore raises.

Every message names what went wrong, the URL involved (credentials removed) and
what to do about it. They all derive from :class:`CkptStoreError`, so one
``except ckptstore.CkptStoreError`` catches everything the library raises on
purpose.
"""

from __future__ import annotations

import contextlib
import logging


class CkptStoreError(Exception):
    """Base class of every error ckptstore raises on purpose."""


class ConfigurationError(CkptStoreError, ValueError):
    """The manager was given arguments it cannot work with (bad URL, unwritable staging)."""


class MissingExtraError(CkptStoreError, ImportError):
    """The URL needs an optional dependency that is not installed."""


class ManifestError(CkptStoreError, ValueError):
    """A manifest is malformed or describes something unsafe; it is never trusted."""


class UploadError(CkptStoreError):
    """One or more checkpoints could not be uploaded, verified and committed.

    Raised by :meth:`CheckpointManager.sync` and :meth:`CheckpointManager.close`.
    ``failures`` maps each checkpoint prefix name to the error that stopped it.
    Nothing already committed on the remote was touched, and the staged files of
    the failed checkpoints stay in the staging directory, so the next manager
    started on the same staging directory uploads them.
    """

    def __init__(self, message: str, failures: dict[str, BaseException] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class VerificationError(CkptStoreError):
    """A stored object does not match its manifest (size or checksum)."""


class RestoreError(CkptStoreError):
    """No committed checkpoint on the remote could be downloaded and verified."""


class RemoteUnavailableError(CkptStoreError, ConnectionError):
    """The remote could not be reached even after retrying."""


class StagingFullError(CkptStoreError, OSError):
    """The disk of the staging directory has no room for a checkpoint being downloaded.

    An ``OSError`` with the ``errno`` the filesystem gave (``ENOSPC``, or ``EDQUOT``
    for a quota); the message names the staging directory, the bytes the checkpoint
    needs, and the fix. The partial download is removed before it is raised.
    """


class OwnershipError(CkptStoreError):
    """The run is written by another live process, so this one may not write it.

    Raised by ``save()`` on a manager that found a live writer (it reads only),
    and by ``sync()``/``close()`` of a writer that lost the run to another
    process. ``holder`` describes the other writer (host, pid, since, last seen)
    when it is known.
    """

    def __init__(self, message: str, holder: object = None):
        super().__init__(message)
        self.holder = holder


class OwnershipLost(OwnershipError):
    """This process was the run's writer and another process took the run over.

    From that moment it commits and deletes nothing more on the remote.
    """


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (keeping its type): what ckptstore was doing, and where.

    ``BaseException.add_note`` exists from Python 3.11 on. On 3.10 the note is
    kept in ``__notes__`` the same way, but tracebacks there do not print it,
    so it is also logged (WARNING), where the user will see the URL.
    """
    if hasattr(exc, "add_note"):
        exc.add_note(note)
        return
    notes = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        # An exception type with __slots__ takes no attribute: the log line remains.
        with contextlib.suppress(AttributeError):
            exc.__notes__ = notes  # type: ignore[attr-defined]
    notes.append(note)
    logging.getLogger("ckptstore").warning("%s: %s", type(exc).__name__, note)
