"""``ckptstore.checkpoints_iterator``: ``tf.train.checkpoints_iterator`` for any remote.

A sidecar evaluator loops over the checkpoints a trainer commits. With a remote
(``s3://``, ``gs://``, ``gdrive://``, any fsspec URL) each poll lists the
committed manifests, picks the newest checkpoint by its manifest (number, then
timestamp; the remote ``checkpoint`` state file may lag behind them), downloads
it into a local directory of the iterator's own and checks every file against
the manifest. Only then is the local prefix yielded, so
``tf.train.Checkpoint.restore()`` reads nothing that was not verified.

The loop is TensorFlow's (``checkpoint_utils.checkpoints_iterator`` and
``wait_for_new_checkpoint``, TF 2.16-2.21), step for step: the same
``timeout``/``timeout_fn`` contract and ``min_interval_secs``, and only the
newest checkpoint is yielded, so checkpoints committed between two polls are
skipped. A plain local path is handed to TensorFlow's own iterator.

The iterator is a pure reader. It never writes, deletes or renames anything on
the remote: no lease, no orphan collection, no adoption of a TensorFlow
directory, no state file. Locally it deletes only the files it downloaded: the
previous checkpoint once the next one is in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ckptstore import backends, staging
from ckptstore.errors import (
    CkptStoreError,
    ConfigurationError,
    ManifestError,
    RemoteUnavailableError,
    VerificationError,
)
from ckptstore.manifest import Manifest
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote, local_copy_matches
from ckptstore.retry import RetryPolicy
from ckptstore.staging import tf

T = TypeVar("T")
log = logging.getLogger("ckptstore")

#: TensorFlow's ``wait_for_new_checkpoint`` sleeps one second between looks.
POLL_INTERVAL_SECS = 1.0
#: Protocols whose first path component is a bucket that must exist.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})


def checkpoints_iterator(
    url: str | os.PathLike,
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    staging_dir: str | os.PathLike | None = None,
    poll_interval_secs: float = POLL_INTERVAL_SECS,
    retry: RetryPolicy | None = None,
) -> Iterator[str]:
    """Yield each newly committed checkpoint as a verified local prefix.

    ``tf.train.checkpoints_iterator`` for a directory that a
    :class:`ckptstore.CheckpointManager` writes to, wherever it is. Example, a
    sidecar evaluator::

        ckpt = tf.train.Checkpoint(model=model)
        for prefix in ckptstore.checkpoints_iterator("s3://bucket/run-7", timeout=600):
            ckpt.restore(prefix).expect_partial()
            print(prefix, model.evaluate(val_data))

    The positional arguments are TensorFlow's, with its defaults and meaning:
    each wait for a new checkpoint lasts at most ``timeout`` seconds (``None``:
    forever); when it expires the iterator ends, unless ``timeout_fn`` is given,
    in which case it ends only when ``timeout_fn()`` returns true (TensorFlow
    also calls it after every yielded checkpoint). ``min_interval_secs`` is the
    least time between two yields. Only the newest committed checkpoint is
    yielded: those committed in between two looks are skipped.

    A newly committed checkpoint is downloaded and every file checked against
    its manifest before its prefix is yielded. One that fails the check is
    never yielded (a warning says why); the iterator waits for the next one.
    Once the next checkpoint is in place, the local copy of the previous one
    is deleted, so a yielded prefix is valid until the iterator is advanced.

    Transient network errors are retried with ``retry``, then logged and the
    remote looked at again later: an evaluator outlives a blip. A permanent
    error (a missing bucket, refused credentials) raises.

    Nothing on the remote is ever written, deleted or renamed.

    Args:
        url: where the checkpoints are committed: ``s3://``, ``gs://``,
            ``gdrive://``, any fsspec URL, or a local path. A local path without
            ``staging_dir`` is handed to ``tf.train.checkpoints_iterator``
            (it reads TensorFlow's ``checkpoint`` state file).
        min_interval_secs: least number of seconds between two yields.
        timeout: most seconds to wait for a new checkpoint; ``None`` waits forever.
        timeout_fn: called after a timeout (and after each yield); returning
            true ends the iterator.
        storage_options: keyword arguments for the fsspec filesystem
            (credentials, endpoint, ...). Never logged or shown.
        staging_dir: local directory the checkpoints are downloaded into. By
            default a private temporary directory next to the manager's default
            staging directory (``$CKPTSTORE_STAGING_DIR`` sets the base), removed
            when the iterator ends or is closed. A directory given here is used
            as it is; the last yielded checkpoint stays in it, and files the
            iterator did not download are never touched (a different copy of a
            checkpoint already there is an error, rather than overwritten).
        poll_interval_secs: seconds between two looks at the remote while
            waiting (TensorFlow's fixed ``seconds_to_sleep``, 1 s). Every look
            lists the remote once.
        retry: how transient storage errors are retried before a look counts
            as failed; default ``RetryPolicy()``.

    Returns:
        An iterator of local checkpoint prefixes, for ``checkpoint.restore()``.

    Raises:
        ConfigurationError: unknown protocol, malformed URL, rejected
            ``storage_options``, a missing bucket or refused credentials, a
            staging directory that is not writable or holds a different copy.
        MissingExtraError: the protocol's client library is not installed.
        RemoteUnavailableError: the remote fails in a way that retrying
            cannot fix.
    """
    url = os.fspath(url)
    if poll_interval_secs < 0:
        raise ConfigurationError("poll_interval_secs must not be negative")
    if not backends.is_remote_url(url) and staging_dir is None:
        if poll_interval_secs == POLL_INTERVAL_SECS:
            return tf.train.checkpoints_iterator(url, min_interval_secs, timeout, timeout_fn)

        def latest_local(last: str | None) -> str | None:
            path = tf.train.latest_checkpoint(url)
            return path if path is not None and path != last else None

        return _checkpoints(
            latest_local, url, min_interval_secs, timeout, timeout_fn, poll_interval_secs
        )

    redactor = Redactor(url, storage_options)
    backend, root = backends.resolve(
        url if backends.is_remote_url(url) else os.path.abspath(url), storage_options
    )
    remote = Remote(backend, root, redactor.url)
    if staging_dir is not None:
        staging_dir = staging.prepare_staging_dir(os.fspath(staging_dir))
    reader = _Reader(remote, redactor, retry or RetryPolicy(), staging_dir)
    return _checkpoints(
        reader.poll,
        redactor.url,
        min_interval_secs,
        timeout,
        timeout_fn,
        poll_interval_secs,
        on_start=reader.open,
        on_close=reader.close,
    )


def _checkpoints(
    poll: Callable[[str | None], str | None],
    where: str,
    min_interval_secs: float,
    timeout: float | None,
    timeout_fn: Callable[[], bool] | None,
    seconds_to_sleep: float,
    *,
    on_start: Callable[[], None] | None = None,
    on_close: Callable[[], None] | None = None,
) -> Iterator[str]:
    """TensorFlow's ``checkpoints_iterator`` loop, over ``poll(last) -> new path or None``."""
    try:
        if on_start is not None:
            on_start()
        checkpoint_path = None
        while True:
            new_checkpoint_path = _wait_for_new_checkpoint(
                poll, where, checkpoint_path, seconds_to_sleep, timeout
            )
            if new_checkpoint_path:
                start = time.time()
                checkpoint_path = new_checkpoint_path
                yield checkpoint_path
                time_to_next_eval = start + min_interval_secs - time.time()
                if time_to_next_eval > 0:
                    time.sleep(time_to_next_eval)
            elif timeout_fn is None:
                # No way to determine if any additional checkpoints will be generated.
                log.info("Timed-out waiting for a checkpoint (without timeout_fn).")
                return
            # Check if more new checkpoints may be generated.
            if timeout_fn is not None and timeout_fn():
                log.info("Done. No new checkpoints will be generated.")
                return
    finally:
        if on_close is not None:
            on_close()


def _wait_for_new_checkpoint(
    poll: Callable[[str | None], str | None],
    where: str,
    last_checkpoint: str | None,
    seconds_to_sleep: float,
    timeout: float | None,
) -> str | None:
    """TensorFlow's ``wait_for_new_checkpoint``: a new path, or ``None`` at the timeout."""
    log.info("Waiting for new checkpoint at %s", where)
    stop_time = time.time() + timeout if timeout is not None else None
    while True:
        checkpoint_path = poll(last_checkpoint)
        if checkpoint_path is None:
            if stop_time is not None and time.time() + seconds_to_sleep > stop_time:
                return None
            time.sleep(seconds_to_sleep)
        else:
            log.info("Found new checkpoint at %s", checkpoint_path)
            return checkpoint_path


class _Reader:
    """One look at the remote per :meth:`poll`; downloads and verifies what is new."""

    def __init__(
        self, remote: Remote, redactor: Redactor, retry: RetryPolicy, staging_dir: str | None
    ):
        self.remote = remote
        self.redactor = redactor
        self.retry = retry
        self.staging_dir = staging_dir
        self._private = staging_dir is None
        self._manifests: dict[str, Manifest] = {}  # committed, read once each
        self._bad_manifests: dict[str, str] = {}  # name -> the problem already warned about
        self._rejected: set[tuple[str, float]] = set()  # (name, timestamp) that failed checks
        self._held: list[str] = []  # files of the yielded checkpoint that this reader placed
        self._bucket_checked = False
        self._failing = False

    # --- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Create the private staging directory (only once iteration starts: nothing leaks)."""
        if not self._private:
            return
        shared = staging.default_staging_dir(self.redactor.url)
        base = os.path.dirname(shared)
        try:
            os.makedirs(base, exist_ok=True)
            self.staging_dir = tempfile.mkdtemp(
                prefix=f"{os.path.basename(shared)}.reader-{os.getpid()}-", dir=base
            )
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot create a staging directory under {base!r} ({exc.strerror or exc}). "
                "Pass staging_dir= a writable local directory with room for two checkpoints, "
                "or set CKPTSTORE_STAGING_DIR."
            ) from None

    def close(self) -> None:
        if self._private:
            if self.staging_dir is not None:
                shutil.rmtree(self.staging_dir, ignore_errors=True)
            self.staging_dir = None
            self._held = []
        # A staging_dir of the user's keeps the last yielded checkpoint, as TensorFlow's would.

    # --- one look ----------------------------------------------------------------------

    def poll(self, last: str | None) -> str | None:
        """Return the local prefix of the newest committed checkpoint if it is new and verified."""
        committed = self._committed()
        if not committed:
            return None
        newest = max(
            committed.values(),
            key=lambda m: (m.number if m.number is not None else -1, m.timestamp),
        )
        assert self.staging_dir is not None
        prefix = os.path.join(self.staging_dir, newest.checkpoint)
        if prefix == last or (newest.checkpoint, newest.timestamp) in self._rejected:
            return None
        return self._fetch(newest)

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        return self.retry.call(
            operation,
            is_transient=self.remote.backend.is_transient,
            what=f"{what} {self.remote.url}",
            scrub=self.redactor.scrub,
        )

    def _committed(self) -> dict[str, Manifest] | None:
        """Every committed checkpoint's manifest, or ``None`` when the remote could not be read."""
        try:
            names = self._call("list", self.remote.list_names)
            if not names and not self._bucket_checked:
                self._check_bucket()
            listed = self.remote.committed_names(names)
            unread = [n for n in listed if n not in self._manifests]
            read = self._call("read the manifests on", lambda: self.remote.read_manifests(unread))
        except FileNotFoundError:
            # A manifest listed a moment ago is gone: the writer retired it. Look again later.
            log.debug("A manifest on %s was retired while being read", self.remote.url)
            return None
        except CkptStoreError:
            raise
        except Exception as exc:
            self._failed("read", exc)
            return None
        if self._failing:
            log.info("%s can be read again", self.remote.url)
            self._failing = False
        self._manifests = {n: m for n, m in self._manifests.items() if n in listed}
        for name, result in read.items():
            if isinstance(result, ManifestError):
                if self._bad_manifests.get(name) != str(result):
                    log.warning("Ignoring %s on %s: %s", name, self.remote.url, result)
                    self._bad_manifests[name] = str(result)
            else:
                self._manifests[name] = result
                self._bad_manifests.pop(name, None)
        return self._manifests

    def _check_bucket(self) -> None:
        """An empty listing of a missing bucket is a mistake to report, not a wait."""
        self._bucket_checked = True
        if self.remote.backend.protocol not in _BUCKET_PROTOCOLS:
            return
        bucket = self.remote.root.split("/", 1)[0]
        try:
            self._call("look up the bucket of", lambda: self.remote.fs.info(bucket))
        except FileNotFoundError:
            raise ConfigurationError(
                f"The bucket {bucket!r} of {self.remote.url} does not exist, or these "
                "credentials cannot see it. Fix the URL or the credentials in storage_options "
                "(or start the trainer, which needs the bucket too)."
            ) from None
        except Exception as exc:
            # Permission to read a prefix without permission to look at its bucket is
            # common (IAM conditions); only "no such bucket" is conclusive.
            self._bucket_checked = not self.remote.backend.is_transient(exc)
            log.debug("Could not look up bucket %r: %s", bucket, self.redactor.describe(exc))

    def _fetch(self, manifest: Manifest) -> str | None:
        """Download and verify ``manifest``'s checkpoint; its local prefix, or ``None``."""
        assert self.staging_dir is not None
        name = manifest.checkpoint
        prefix = os.path.join(self.staging_dir, name)
        mine = True
        if self._already_here(manifest):
            mine = False  # someone else's verified copy: used, never deleted
        else:
            try:
                self._call(
                    f"download {name} from",
                    lambda: self.remote.download_verified(manifest, self.staging_dir),
                )
            except (VerificationError, FileNotFoundError) as exc:
                self._not_verified(manifest, exc)
                return None
            except CkptStoreError:
                raise
            except Exception as exc:
                self._failed(f"download {name} from", exc)
                return None
        for stale in self._held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.staging_dir, stale))
        self._held = [e.name for e in manifest.files] if mine else []
        return prefix

    def _already_here(self, manifest: Manifest) -> bool:
        """Whether staging holds this checkpoint already; an error if it holds another copy."""
        assert self.staging_dir is not None
        present = [
            e.name
            for e in manifest.files
            if os.path.lexists(os.path.join(self.staging_dir, e.name))
        ]
        if not present:
            return False
        if local_copy_matches(manifest, self.staging_dir):
            return True
        raise ConfigurationError(
            f"The staging directory {self.staging_dir!r} already holds {', '.join(present)}, "
            f"which differ from {manifest.checkpoint} committed on {self.remote.url}. The "
            "iterator does not overwrite files it did not download: remove them, or pass a "
            "staging_dir of the iterator's own."
        )

    def _not_verified(self, manifest: Manifest, exc: BaseException) -> None:
        """A download that did not match: retired or replaced meanwhile, or damaged."""
        name = manifest.checkpoint
        try:
            current: Manifest | None = self.remote.read_manifest(name)
        except (FileNotFoundError, ManifestError):
            current = None
        except Exception as check_error:  # cannot tell now; the next look tries again
            log.info(
                "Download of %s from %s failed (%s) and its manifest cannot be read (%s); "
                "trying again at the next look",
                name,
                self.remote.url,
                self.redactor.describe(exc),
                self.redactor.describe(check_error),
            )
            return
        if current != manifest:
            log.info(
                "%s changed on %s while it was downloaded; looking again", name, self.remote.url
            )
            self._manifests.pop(name, None)
            return
        self._rejected.add((name, manifest.timestamp))
        log.warning(
            "Not yielding %s from %s: %s. It does not match its manifest and is skipped; "
            "waiting for the next checkpoint.",
            name,
            self.remote.url,
            self.redactor.describe(exc),
        )

    def _failed(self, what: str, exc: BaseException) -> None:
        """Log a transient failure (the next look tries again); raise a permanent one."""
        url = self.remote.url
        described = self.redactor.describe(exc)
        if isinstance(exc, TypeError):
            # fsspec clients accept any keyword at construction and reject it on first use.
            raise ConfigurationError(
                f"storage_options for {url} were not accepted by the client: {described}. "
                "Check the option names against that filesystem's docs."
            ) from None
        if self.remote.backend.is_transient(exc):
            level = logging.INFO if self._failing else logging.WARNING
            log.log(
                level,
                "Could not %s %s after %d attempt(s) (%s); still waiting for checkpoints, "
                "looking again in a moment",
                what,
                url,
                self.retry.attempts,
                described,
            )
            self._failing = True
            return
        if isinstance(exc, PermissionError):
            raise ConfigurationError(
                f"Permission denied to {what} {url} ({described}). Check the credentials "
                "(storage_options or the environment): they must allow listing and reading it."
            ) from None
        raise RemoteUnavailableError(
            f"Cannot {what} {url} ({described}). This is not a transient network error, so "
            "the iterator stops: check the URL, that the bucket or folder exists, and the "
            "credentials, then start it again."
        ) from None
