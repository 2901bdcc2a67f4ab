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
import posixpath

from ckptstore import staging
from ckptstore.errors import ManifestError, RemoteUnavailableError, RestoreError, VerificationError
from ckptstore.manifest import Manifest
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote, local_copy_matches
from ckptstore.retry import RetryPolicy
from ckptstore.uploader import UploadRequest

log = logging.getLogger("ckptstore")


@dataclasses.dataclass
class ResumePlan:
    """What a new manager on a remote starts from."""

    state: staging.CheckpointState | None  # for CheckpointBook.recover, staging paths
    committed: dict[str, Manifest]
    to_upload: list[UploadRequest]
    protected_from_gc: set[str]  # listed by a state file: never collected as orphans


def _number_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def plan_resume(
    remote: Remote, staging_dir: str, retry: RetryPolicy, redactor: Redactor
) -> ResumePlan:
    """Read the remote and the staging directory; decide what the manager manages.

    Raises:
        RemoteUnavailableError: the remote cannot be listed even after retrying.
            Starting anyway could mean silently training from scratch.
    """
    try:
        names = retry.call(
            remote.list_names,
            transient=remote.backend.transient_errors,
            what=f"list {remote.url}",
            scrub=redactor.scrub,
        )
        manifests = remote.read_manifests(remote.committed_names(names))
        remote_state = staging.parse_state_text(remote.read_state_text() or "")
    except (OSError, *remote.backend.transient_errors) as exc:
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

    entries: dict[str, float] = {}
    protected: set[str] = set()
    last_preserved: float | None = None
    if remote_state is not None:
        paths = [posixpath.basename(p) for p in remote_state.all_model_checkpoint_paths]
        protected.update(paths)
        stamps = list(remote_state.all_model_checkpoint_timestamps) or [
            remote_state.last_preserved_timestamp
        ] * len(paths)
        for name, ts in zip(paths, stamps):
            if name in committed:
                entries[name] = ts
        last_preserved = remote_state.last_preserved_timestamp
    elif committed:
        # The state file is gone (deleted by hand, or a crash before the first
        # one was written): rebuild the order from the manifests themselves.
        for name, m in sorted(committed.items(), key=lambda kv: kv[1].timestamp):
            entries[name] = m.timestamp
        last_preserved = min(entries.values()) - 1.0

    to_upload = _staged_to_resume(staging_dir, committed, entries)
    for request in to_upload:
        entries.pop(request.checkpoint, None)
        entries[request.checkpoint] = request.timestamp
    if to_upload and last_preserved is None:
        last_preserved = min(r.timestamp for r in to_upload) - 1.0

    state = None
    if entries:
        state = staging.CheckpointState(
            model_checkpoint_path=os.path.join(staging_dir, next(reversed(entries))),
            all_model_checkpoint_paths=[os.path.join(staging_dir, n) for n in entries],
            all_model_checkpoint_timestamps=list(entries.values()),
            last_preserved_timestamp=last_preserved if last_preserved is not None else 0.0,
        )
    return ResumePlan(state, committed, to_upload, protected)


def _staged_to_resume(
    staging_dir: str, committed: dict[str, Manifest], entries: dict[str, float]
) -> list[UploadRequest]:
    local = staging.read_state_file(staging_dir)
    if local is None:
        return []
    newest = max(
        [m.timestamp for m in committed.values()] + list(entries.values()), default=-math.inf
    )
    stamps = list(local.all_model_checkpoint_timestamps) or [0.0] * len(
        local.all_model_checkpoint_paths
    )
    resume: list[UploadRequest] = []
    for path, ts in zip(local.all_model_checkpoint_paths, stamps):
        name = os.path.basename(path)
        if name in committed and committed[name].timestamp == ts:
            continue  # the staged copy is a cache of a committed checkpoint
        if not os.path.exists(os.path.join(staging_dir, name + ".index")):
            continue
        if ts > newest:
            log.info("Resuming the upload of %s, staged but never committed", name)
            resume.append(UploadRequest(name, _number_of(name), None, ts))
        else:
            log.warning(
                "Dropping staged %s: the remote already holds newer committed checkpoints", name
            )
            staging.delete_checkpoint_files(os.path.join(staging_dir, name))
    return resume


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
                transient=remote.backend.transient_errors,
                what=f"download {name}",
                scrub=redactor.scrub,
            )
        except (VerificationError, FileNotFoundError) as exc:
            problem = f"{name}: {redactor.describe(exc)}"
            problems.append(problem)
            log.warning(
                "Not restoring %s from %s: %s. Trying the previous checkpoint.",
                name,
                remote.url,
                problem,
            )
            continue
        except remote.backend.transient_errors as exc:
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
