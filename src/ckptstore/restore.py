"""The data path backwards: what exists, what to resume, and fetching it verified.

:func:`plan_resume` runs when a manager starts on a remote. Committed manifests
are the truth about what exists; the remote ``checkpoint`` state file only
orders them and carries TensorFlow's preservation clock. Staged checkpoints
that never reached the remote (the previous process died) are resumed if they
are newer than everything committed; older ones are stale and dropped.

:func:`fetch_restorable` picks the newest committed checkpoint, downloads it
into staging, checks every file against its manifest, and only then hands the
prefix to TensorFlow. A checkpoint that fails its check is never loaded: the
previous one is tried, and when none is left a :class:`RestoreError` says what
was found, rather than silently starting from scratch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from ckptstore import artifact, staging
from ckptstore.errors import (
    ConfigurationError,
    ManifestError,
    RemoteUnavailableError,
    RestoreError,
    VerificationError,
)
from ckptstore.manifest import Manifest, checkpoint_of_data_file
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote, local_copy_matches
from ckptstore.retry import RetryPolicy
from ckptstore.uploader import UploadRequest

T = TypeVar("T")
log = logging.getLogger("ckptstore")


@dataclasses.dataclass
class RemoteView:
    """What a remote holds, read without writing anything (any process may build one)."""

    names: list[str]
    committed: dict[str, Manifest]
    state: staging.CheckpointState | None
    #: complete checkpoints TensorFlow wrote there, hashed where stored but not committed:
    #: only the run's writer commits their manifests (:func:`adopt`)
    adoptable: dict[str, Manifest]


@dataclasses.dataclass
class ResumePlan:
    """What a new manager on a remote starts from."""

    state: staging.CheckpointState | None  # for CheckpointBook.recover, staging paths
    committed: dict[str, Manifest]
    to_upload: list[UploadRequest]  # staged by a dead predecessor, never committed
    retired: list[str]  # committed, but the predecessor had already retired them
    managed: set[str] = dataclasses.field(default_factory=set)  # names the book manages


def _number_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _entries_of(state: staging.CheckpointState) -> dict[str, float]:
    """``{name: timestamp}``, oldest first, from a state file (TensorFlow's fallback included)."""
    names = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
    stamps = list(state.all_model_checkpoint_timestamps) or [state.last_preserved_timestamp] * len(
        names
    )
    return dict(zip(names, stamps))


def read_remote(
    remote: Remote,
    retry: RetryPolicy,
    redactor: Redactor,
    *,
    checkpoint_name: str = "ckpt",
    stop: threading.Event | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> RemoteView:
    """List the remote and read its manifests and state file; write nothing.

    ``stop``, once set, ends the retrying at its next pause (the caller gave up);
    ``on_failure`` is told of each failed attempt.

    Raises:
        RemoteUnavailableError: the remote cannot be listed even after retrying.
            Starting anyway could mean silently training from scratch.
        ConfigurationError: the client rejected ``storage_options``.
    """
    from ckptstore.ownership import LEASE_NAME  # ownership imports this module's neighbours

    def call(what: str, operation: Callable[[], T]) -> T:
        return retry.call(
            operation,
            is_transient=remote.backend.is_transient,
            what=f"{what} {remote.url}",
            scrub=redactor.scrub,
            stop=stop,
            on_failure=on_failure,
        )

    try:
        names = call("list", remote.list_names)
        manifests = call(
            "read the manifests on", lambda: remote.read_manifests(remote.committed_names(names))
        )
        remote_state = staging.parse_state_text(
            call("read the state file on", remote.read_state_text) or ""
        )
        adoptable: dict[str, Manifest] = {}
        if not manifests and LEASE_NAME not in names:
            # No manifest and no ckptstore lease: a directory TensorFlow wrote. (A lease
            # means ckptstore writes here, and its data without manifests is in flight.)
            adoptable = call(
                "read the checkpoints on",
                lambda: describe_tensorflow_checkpoints(
                    remote, names, remote_state, checkpoint_name
                ),
            )
    except TypeError as exc:
        # fsspec clients accept any keyword at construction and reject it on first use.
        raise ConfigurationError(
            f"storage_options for {remote.url} were not accepted by the client: "
            f"{redactor.describe(exc)}. Check the option names against that filesystem's docs."
        ) from None
    except Exception as exc:  # any client failure here means we cannot know what exists
        raise RemoteUnavailableError(
            f"Cannot read {remote.url} ({redactor.describe(exc)}). ckptstore will not start "
            "without knowing what the remote holds; check the URL, the network and the "
            "credentials, then create the manager again."
        ) from None

    committed: dict[str, Manifest] = {}
    for name, result in manifests.items():
        if isinstance(result, ManifestError):
            log.warning("Ignoring %s on %s: %s", name, remote.url, result)
        else:
            committed[name] = result
    return RemoteView(names, committed, remote_state, adoptable)


def plan_resume(view: RemoteView, staging_dir: str, *, resume_staged: bool = True) -> ResumePlan:
    """Decide what a manager manages, from the remote's view and its staging directory.

    Pure: it reads the local state file and looks for staged files, and changes
    nothing anywhere. Committed manifests are the truth about what exists; the
    remote state file only orders them and carries TensorFlow's preservation
    clock, and a manifest newer than everything it lists (a writer killed
    between the two writes) is added after them.

    ``resume_staged=False`` ignores checkpoints staged here but never committed
    (under ``MultiWorkerMirroredStrategy``: every worker must restore the same
    checkpoint, and the others can only see what is committed).
    """
    committed = {**view.adoptable, **view.committed}
    remote_state = view.state
    by_time = sorted(committed.items(), key=lambda kv: (kv[1].timestamp, kv[1].number or 0))
    if remote_state is not None:
        entries = {n: ts for n, ts in _entries_of(remote_state).items() if n in committed}
        last_preserved = remote_state.last_preserved_timestamp
        newest_listed = max(entries.values(), default=-math.inf)
        for name, m in by_time:
            if name not in entries and m.timestamp > newest_listed:
                entries[name] = m.timestamp
    else:
        entries = {n: m.timestamp for n, m in by_time}
        last_preserved = min(entries.values(), default=0.0) - 1.0

    # Staging ahead of the remote means a process on this machine saved
    # checkpoints it never committed. Its state file is then the newer truth:
    # it already reflects its own retention decisions.
    local = staging.read_state_file(staging_dir)
    newest_committed = max((m.timestamp for m in committed.values()), default=-math.inf)
    to_upload: list[UploadRequest] = []
    retired: list[str] = []
    if (
        resume_staged
        and local is not None
        and max(_entries_of(local).values(), default=-math.inf) > newest_committed
    ):
        local_entries = _entries_of(local)
        resumed: dict[str, float] = {}
        for name, ts in local_entries.items():
            if name in committed and committed[name].timestamp == ts:
                resumed[name] = ts
            elif ts > newest_committed and os.path.exists(
                os.path.join(staging_dir, name + ".index")
            ):
                to_upload.append(UploadRequest(name, _number_of(name), None, ts))
                resumed[name] = ts
        retired = [n for n in entries if n not in resumed]
        entries, last_preserved = resumed, local.last_preserved_timestamp

    state = None
    if entries:
        state = staging.CheckpointState(
            model_checkpoint_path=os.path.join(staging_dir, next(reversed(entries))),
            all_model_checkpoint_paths=[os.path.join(staging_dir, n) for n in entries],
            all_model_checkpoint_timestamps=list(entries.values()),
            last_preserved_timestamp=last_preserved,
        )
    return ResumePlan(state, committed, to_upload, retired, set(entries))


def describe_tensorflow_checkpoints(
    remote: Remote,
    names: list[str],
    state: staging.CheckpointState | None,
    checkpoint_name: str = "ckpt",
) -> dict[str, Manifest]:
    """Manifests for the complete checkpoints of a directory TensorFlow wrote (not committed).

    Only the manager's own ``<checkpoint_name>-<number>`` checkpoints: a
    ``bert.index`` copied in beside them is somebody else's, and adopting it
    would hand it to ``max_to_keep``. Trust on first use: nothing vouched for
    these bytes before, so they are hashed where they are stored. Incomplete
    ones are left out with a warning.
    """
    stamps = _entries_of(state) if state is not None else {}
    own = re.compile(re.escape(checkpoint_name) + r"-\d+")
    found = sorted(
        {c for n in names if (c := checkpoint_of_data_file(n)) is not None and own.fullmatch(c)}
    )
    described: dict[str, Manifest] = {}
    for checkpoint in found:
        manifest = remote.describe_stored(
            checkpoint, names, number=_number_of(checkpoint), timestamp=stamps.get(checkpoint, 0.0)
        )
        if manifest is None:
            log.warning("Not adopting %s on %s: its files are incomplete", checkpoint, remote.url)
            continue
        described[checkpoint] = manifest
    return described


def adopt(remote: Remote, adoptable: dict[str, Manifest]) -> None:
    """Commit the manifests of TensorFlow-written checkpoints (the run's writer only).

    From then on ckptstore verifies them instead of taking them for crash leftovers.
    """
    for checkpoint, manifest in adoptable.items():
        remote.commit(manifest)
        log.info("Adopted %s, written by TensorFlow, on %s", checkpoint, remote.url)


def drop_unmanaged_staged(staging_dir: str, managed: set[str]) -> None:
    """Delete staged copies of checkpoints ckptstore staged and nobody manages any more.

    They are left when a process dies between retiring a checkpoint and
    tidying staging; every one worth keeping is either managed or committed on
    the remote. Only checkpoints ckptstore staged itself (its journal) are
    candidates: a ``staging_dir`` may be the user's own directory, and their
    checkpoints there are never deleted.
    """
    for checkpoint in staging.staged_names(staging_dir):
        if checkpoint not in managed:
            staging.delete_checkpoint_files(os.path.join(staging_dir, checkpoint))


def fetch_restorable(
    remote: Remote,
    committed: dict[str, Manifest],
    candidates: list[str],
    staging_dir: str,
    retry: RetryPolicy,
    redactor: Redactor,
) -> str | None:
    """Return a local prefix TensorFlow can restore, newest candidate first.

    ``candidates`` are checkpoint names, newest first. A candidate with no
    manifest is a staged checkpoint of this machine that is not committed yet:
    it is TensorFlow's own finished write and is used as is.

    Raises:
        RestoreError: every committed candidate failed verification.
        RemoteUnavailableError: downloads keep failing for network reasons.
    """
    problems: list[str] = []
    for name in candidates:
        prefix = os.path.join(staging_dir, name)
        m = committed.get(name)
        if m is None:
            if os.path.exists(prefix + ".index"):
                return prefix
            continue
        if local_copy_matches(m, staging_dir):
            return prefix
        try:
            retry.call(
                lambda m=m: remote.download_verified(m, staging_dir),
                is_transient=remote.backend.is_transient,
                what=f"download {name}",
                scrub=redactor.scrub,
            )
        except (VerificationError, FileNotFoundError) as exc:
            if isinstance(exc, FileNotFoundError):
                problem = f"{name}: deleted from the remote since it was listed (retired?)"
            else:
                problem = f"{name}: {redactor.describe(exc)}"
            problems.append(problem)
            log.warning(
                "Not restoring %s from %s: %s. Trying the previous checkpoint.",
                name,
                remote.url,
                problem,
            )
            continue
        except Exception as exc:
            if not remote.backend.is_transient(exc):
                raise
            raise RemoteUnavailableError(
                f"Cannot download {name} from {remote.url}: {redactor.describe(exc)}. "
                "Nothing was restored; retry when the remote is reachable."
            ) from None
        if problems:
            log.warning(
                "Restored %s after %d newer checkpoint(s) failed verification", name, len(problems)
            )
        return prefix
    if problems:
        raise RestoreError(
            f"{remote.url} holds committed checkpoints, but none could be verified: "
            + "; ".join(problems)
            + ". Nothing was loaded. Inspect the remote, or start a fresh run in another directory."
        )
    return None


def fetch_artifact(
    remote: Remote,
    name: str,
    local_dir: str,
    retry: RetryPolicy,
    redactor: Redactor,
) -> Manifest | None:
    """Download a committed artifact (a SavedModel, a Keras file) into ``local_dir``, verified.

    The same restore path as checkpoints: the manifest says what exists, every
    file is checked against it before anything is handed to TensorFlow or Keras,
    and a copy already in ``local_dir`` that matches is not downloaded again.
    Returns the manifest, or ``None`` when ``name`` has no committed manifest.

    Raises:
        RestoreError: the stored files do not match the manifest (tampered,
            truncated, or deleted since it was committed); nothing is loaded.
        RemoteUnavailableError: the remote cannot be read, even after retrying.
    """
    from ckptstore.publisher import read_committed  # the publisher imports this module

    call = artifact.caller(remote, redactor, retry)
    try:
        manifest = read_committed(remote, name, call)
        if manifest is None:
            return None
        if local_copy_matches(manifest, local_dir):
            return manifest
        call(f"download {name}", lambda: remote.download_verified(manifest, local_dir))
    except (VerificationError, FileNotFoundError) as exc:
        problem = "a file it lists is missing" if isinstance(exc, FileNotFoundError) else str(exc)
        raise RestoreError(
            f"{remote.url}: the committed {name} does not match its manifest ({problem}); "
            "nothing was loaded. It was changed after ckptstore committed it: save it again, "
            "or load an earlier copy."
        ) from None
    except (RestoreError, ManifestError):
        raise
    except Exception as exc:
        if not remote.backend.is_transient(exc):
            raise
        raise RemoteUnavailableError(
            f"Cannot download {name} from {remote.url}: {redactor.describe(exc)}. "
            "Nothing was loaded; retry when the remote is reachable."
        ) from None
    return manifest


def why_not_committed(remote: Remote, name: str, found: list[str]) -> str:
    """Why ``name`` has no committed manifest, for an error message.

    ``found`` is what the remote holds where the artifact would be.
    """
    from ckptstore.publisher import pending_name, read_pending

    if pending_name(name) in found or read_pending(remote, name) is not None:
        return (
            "an upload by ckptstore was interrupted before its commit (the process stopped "
            "mid-upload); save it again to the same place to replace it"
        )
    if found:
        return "it holds files ckptstore did not write (no manifest vouches for them)"
    return "nothing is stored there"
