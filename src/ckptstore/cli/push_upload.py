"""How ``ckptstore push`` sends what it found: uploaded, verified, committed.

Checkpoints (:func:`push_checkpoints`): read back by TensorFlow, described,
sorted against what URL holds, then uploaded under the run's writer lease
exactly as a ckptstore writer uploads (:func:`ckptstore.artifact.upload_verified`,
the manifest committed last), and URL's ``checkpoint`` state file written.
SavedModels (:func:`push_saved_model`): through the publisher's own steps
(:func:`ckptstore.publisher.publish`). Each result is said as it happens and
kept in the :class:`~ckptstore.cli.push_plan.Outcome`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Callable
from typing import Any

from fsspec.callbacks import Callback

from ckptstore import __version__, artifact, publisher
from ckptstore import manifest as mf
from ckptstore.cli import common
from ckptstore.cli.push_plan import (
    FAILED,
    IDENTICAL,
    INVALID,
    Outcome,
    classify,
    classify_saved_model,
    select,
    state_plan,
)
from ckptstore.cli.push_source import (
    LocalCheckpoint,
    check_saved_model,
    export_files,
    find_checkpoints,
    read_checkpoint,
    read_dir_state,
)
from ckptstore.errors import OwnershipError, VerificationError
from ckptstore.manifest import Manifest
from ckptstore.ownership import Holder, Lease, Liveness, judge
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy

#: uploads in parallel per artifact (the library's default upload_concurrency)
_CONCURRENCY = 4


# --- what is said and recorded ------------------------------------------------------------


def _skipped(
    args: argparse.Namespace,
    outcome: Outcome,
    name: str,
    url: str,
    status: str,
    reason: str,
    what: str,
) -> None:
    """``name`` is not pushed to ``url``, found there (IDENTICAL or CONFLICT): recorded and said."""
    outcome.skip(name, url, status, reason)
    label = "skipped " if status == IDENTICAL else "CONFLICT"
    args.out.result(f"{label} {url}  ({what})")


def _failed(
    args: argparse.Namespace, outcome: Outcome, name: str, url: str, exc: Exception
) -> bool:
    """An upload that failed, recorded and said: whether to go on with the next one.

    Yes after a file that did not verify (that artifact's problem, exit 1), no
    after the remote failed (the next would fail the same way, after the same
    retries).
    """
    unverified = isinstance(exc, VerificationError)
    if unverified:
        outcome.integrity = True
    outcome.skip(name, url, FAILED, f"not committed: {args.redactor.describe(exc)}")
    why = "did not verify; not committed" if unverified else "not committed"
    args.out.result(f"FAILED   {url}  ({why})")
    return unverified


def _pushed(
    args: argparse.Namespace,
    outcome: Outcome,
    name: str,
    url: str,
    kind: str,
    manifest: Manifest,
    number: int | None,
    step: int | None,
) -> None:
    """``manifest`` is committed at ``url``: recorded and said."""
    outcome.pushed.append(
        {
            "name": name,
            "url": url,
            "kind": kind,
            "number": number,
            "step": step,
            "time": manifest.timestamp,
            "bytes": manifest.total_bytes,
            "files": [e.name for e in manifest.files],
        }
    )
    step_text = f"; step {step}" if step is not None else ""
    args.out.result(
        f"pushed   {url}  ({common.plural(len(manifest.files), 'file')}, "
        f"{common.size_text(manifest.total_bytes)}{step_text})"
    )


# --- checkpoints --------------------------------------------------------------------------


def _take_lease(remote: Remote, args: argparse.Namespace) -> Lease:
    lease = Lease(remote, redactor=args.redactor, library_version=f"{__version__} (ckptstore push)")
    logger = logging.getLogger("ckptstore")
    level = logger.level
    if not args.verbose:  # the library's "took over ... from ..." warning: said below instead
        logger.setLevel(logging.ERROR)
    try:
        previous = common.CLI_RETRY.call(
            lease.acquire,
            is_transient=remote.backend.is_transient,
            what=f"take the writer lease of {remote.url}",
            scrub=args.redactor.scrub,
        )
    except OwnershipError as exc:
        raise _live_writer(remote, exc.holder) from None
    finally:
        logger.setLevel(level)
    if previous is not None:
        args.out.note(
            f"{remote.url}: took over the lease of its last writer (host {previous.host}, pid "
            f"{previous.pid}: {judge(previous)}); released it after"
        )
    return lease


def _live_writer(remote: Remote, holder: Holder | None) -> common.CommandError:
    who = holder.describe() if holder is not None else "another process"
    return common.CommandError(
        f"{remote.url} is being written by {who}; nothing was pushed. A run has one writer, "
        "and push writes only a run no live process writes. Wait until that writer is done "
        "(its close() releases the run; a writer that died loses it when its lease expires), "
        "then push again; or push to another URL."
    )


def push_checkpoints(args: argparse.Namespace, remote: Remote, tf: Any, outcome: Outcome) -> None:
    """Validate, upload, verify and commit DIR's checkpoints, then write URL's state file."""
    source = args.source
    out = args.out
    listed, last_preserved = read_dir_state(source)
    found = find_checkpoints(source, listed)
    if args.checkpoints is None and listed and not any(c.listed for c in found):
        raise common.CommandError(
            f"{source}'s checkpoint state file lists {', '.join(listed)}, but none of their "
            "files are in it; nothing was pushed. Give --checkpoint NAME for the checkpoints it "
            f"does hold ({', '.join(c.name for c in found) or 'none'})."
        )
    selected = select(args, found, bool(listed), outcome)

    # 1. TensorFlow reads each one back, before anything touches URL.
    valid: list[LocalCheckpoint] = []
    for c in selected:
        out.detail(f"reading {c.name} with TensorFlow ({len(c.files)} files)")
        problem, c.step = read_checkpoint(tf, os.path.join(source, c.name))
        if problem is None:
            valid.append(c)
        else:
            outcome.skip(
                c.name,
                None,
                INVALID,
                f"{problem} in {source}; not pushed: ckptstore never commits a checkpoint "
                "TensorFlow cannot restore",
            )
    if not valid:
        refused = "; ".join(
            f"{s['name']}: {s['reason']}" for s in outcome.skipped if s["status"] == INVALID
        )
        raise common.CommandError(
            f"{source} holds no complete, readable checkpoint to push"
            + (f" ({refused})" if refused else "")
            + ". Nothing was pushed."
        )

    # 2. What each one would be committed as.
    manifests: dict[str, Manifest] = {}
    for c in valid:
        manifests[c.name] = mf.describe_files(
            source,
            c.name,
            c.files,
            kind=mf.CHECKPOINT,
            number=c.number,
            step=c.step,
            timestamp=c.timestamp,
            with_md5=remote.backend.needs_md5,
            extra_versions={"tensorflow": tf.__version__},
        )

    # 3. What URL holds (reads only). A live writer: nothing is written.
    read = artifact.caller(remote, args.redactor, common.CLI_RETRY)
    lease_reader = Lease(remote, redactor=args.redactor)
    holder, _ = read("read the writer lease", lease_reader.read)
    if judge(holder) == Liveness.ALIVE:
        raise _live_writer(remote, holder)
    leftovers = set(holder.in_flight) if holder is not None else set()
    upload, identical, _ = classify(remote, read, manifests, leftovers, None)
    ours = [n for n in manifests if n in upload or n in identical]
    new_state, _ = state_plan(remote, read, ours, last_preserved)
    lease = None
    if upload or new_state is not None:
        read("create the remote directory", remote.prepare)  # a local URL: the lease's directory
        lease = _take_lease(remote, args)
    try:
        if lease is not None:
            # Once the run is ours, the truth: what the last writer left in flight may be
            # replaced; anything else uncommitted is not ckptstore's.
            previous = lease.previous
            leftovers = set(previous.in_flight) if previous is not None else set()
        upload, identical, _ = classify(remote, read, manifests, leftovers, outcome)
        if lease is not None:
            # Carried over: what the last writer left half-sent stays listed as in flight,
            # so the next writer or ckptstore gc still knows it is a leftover.
            for name in sorted(leftovers - set(upload)):
                if name not in identical:
                    read("renew the writer lease", lambda n=name: lease.mark_in_flight(n))
        for name in identical:
            url = f"{remote.url.rstrip('/')}/{name}"
            same = "already committed there with the same content"
            _skipped(
                args, outcome, name, url, IDENTICAL, same, "committed there already, same content"
            )
        upload_call = artifact.caller(remote, args.redactor, RetryPolicy())
        for i, name in enumerate(upload):
            if not _push_one(args, remote, lease, manifests[name], upload_call, outcome):
                for rest in upload[i + 1 :]:  # the remote failed: the others would too
                    outcome.skip(
                        rest,
                        f"{remote.url.rstrip('/')}/{rest}",
                        FAILED,
                        f"not pushed: the upload of {name} failed first",
                    )
                break
        ours = [n for n in manifests if any(p["name"] == n for p in outcome.pushed)] + identical
        if lease is not None and ours:
            text, order = state_plan(remote, read, ours, last_preserved)
            if text is not None:
                read("renew the writer lease", lease.renew)
                read("write the state file", lambda: remote.write_state_text(text))
            outcome.state_file = order
        else:
            outcome.state_file = state_plan(remote, read, ours, last_preserved)[1]
    finally:
        if lease is not None:
            lease.release()


def _push_one(
    args: argparse.Namespace,
    remote: Remote,
    lease: Lease | None,
    manifest: Manifest,
    call: artifact.Call,
    outcome: Outcome,
) -> bool:
    """One checkpoint: in flight in the lease, uploaded and verified, committed, done.

    Returns whether to go on with the next one (see :func:`_failed`).
    """
    assert lease is not None  # only uploaded under the run's lease
    name = manifest.checkpoint
    url = f"{remote.url.rstrip('/')}/{name}"
    transfer = common.transfer(args, f"push {name}", manifest.total_bytes)
    ok = False
    try:
        # Listed before the first byte: if push dies now, these files are known leftovers.
        call("record the upload in the writer lease", lambda: lease.mark_in_flight(name))
        artifact.upload_verified(
            remote,
            manifest,
            args.source,
            call=call,
            concurrency=_CONCURRENCY,
            progress=transfer.file,
        )
        call("renew the writer lease", lease.renew)  # still ours, right before the commit
        call(f"commit {name}", lambda: remote.commit(manifest))
        ok = True
    except OwnershipError:
        raise  # the run was taken over: push nothing more
    except Exception as exc:  # VerificationError, or the remote failed
        return _failed(args, outcome, name, url, exc)
    finally:
        transfer.finish(ok=ok)
    lease.mark_done(name)
    _pushed(args, outcome, name, url, mf.CHECKPOINT, manifest, manifest.number, manifest.step)
    return True


# --- SavedModels --------------------------------------------------------------------------


def push_saved_model(
    args: argparse.Namespace,
    tf: Any,
    local_dir: str,
    remote: Remote,
    name: str,
    number: int | None,
    outcome: Outcome,
) -> bool:
    """One SavedModel to ``remote`` (its export directory), through the publisher's steps.

    Returns whether to go on with the next version (no after the remote failed).
    """
    url = remote.url
    problem = check_saved_model(tf, local_dir)
    if problem is not None:
        outcome.skip(
            name, url, INVALID, f"{local_dir} is not a loadable SavedModel: {problem}; not pushed"
        )
        args.out.result(f"REFUSED  {local_dir}  ({problem})")
        return True
    files = export_files(local_dir)
    read = artifact.caller(remote, args.redactor, common.CLI_RETRY)
    there = classify_saved_model(remote, read, local_dir, files)
    if there is not None:
        _skipped(args, outcome, name, url, *there)
        return True
    transfer = common.transfer(
        args,
        f"push {name}",
        sum(os.path.getsize(os.path.join(local_dir, *f.split("/"))) for f in files),
    )
    job = publisher.PublishJob(
        remote=_Reporting(remote, transfer.file),
        redactor=_named(args.redactor, url),
        name=mf.SAVED_MODEL_NAME,
        kind=mf.SAVED_MODEL,
        local_dir=local_dir,
        files=files,
        metadata={"exported_with": "ckptstore push"},
        number=number,
        remove_local=False,  # DIR is the user's
        concurrency=_CONCURRENCY,
    )
    ok = False
    try:
        # Marker, files, saved_model.pb last, each verified, manifest last: the library's steps.
        manifest = publisher.publish(job)
        ok = True
    except Exception as exc:  # VerificationError, or the remote failed
        return _failed(args, outcome, name, url, exc)
    finally:
        transfer.finish(ok=ok)
    _pushed(args, outcome, name, url, mf.SAVED_MODEL, manifest, number, None)
    return True


def _named(redactor: Redactor, url: str) -> Redactor:
    """``redactor``'s secrets, showing ``url`` (a version's own URL) in messages."""
    named = copy.copy(redactor)
    named.url = url
    return named


class _Reporting(Remote):
    """The same remote directory, with every upload also reporting its bytes to a transfer.

    :func:`ckptstore.publisher.publish` keeps its own account of an upload (for
    ``ckptstore.status()`` and its log) and draws no bar unless the library's
    bars are on; a remote that adds push's callback to each upload lets push
    reuse the publisher's steps unchanged and still show the CLI's bar.
    """

    def __init__(self, remote: Remote, file_callback: Callable[[], Any]):
        super().__init__(remote.backend, remote.root, remote.url)
        self._file_callback = file_callback

    def upload(self, local_path: str, entry: mf.FileEntry, callback: Any = None) -> None:
        mine = self._file_callback()
        both = mine if callback is None else _Both(callback, mine)
        super().upload(local_path, entry, both)


class _Both(Callback):
    """One fsspec callback feeding two (each keeps its own count, retries included)."""

    def __init__(self, *callbacks: Callback):
        super().__init__()
        self._callbacks = callbacks

    def call(self, *args: Any, **kwargs: Any) -> None:
        return None

    def set_size(self, size: int) -> None:
        self.size = size
        for c in self._callbacks:
            c.set_size(size)

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        for c in self._callbacks:
            c.relative_update(inc)

    def absolute_update(self, value: int) -> None:
        self.value = value
        for c in self._callbacks:
            c.absolute_update(value)
