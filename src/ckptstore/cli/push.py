"""``ckptstore push DIR URL``: move a TensorFlow checkpoint directory or SavedModel in, committed.

How old runs move in. DIR is what plain TensorFlow wrote: a checkpoint directory
(``tf.train.CheckpointManager``, ``Checkpoint.save``, Estimator's
``model.ckpt-1000``), a SavedModel (``tf.saved_model.save``), or TF Serving's
base of numbered SavedModels (``DIR/1/``, ``DIR/2/``). Each artifact goes up
exactly as the library would have sent it: described (size, CRC32C, MD5 where
the backend keeps only that), every file uploaded and verified
(:func:`ckptstore.artifact.upload_verified`), the manifest committed last. For
checkpoints, TensorFlow's ``checkpoint`` state file is then written on the
remote, so ``ckptstore.CheckpointManager(ckpt, URL)`` on a fresh machine
restores the newest one; SavedModels go through the publisher's own steps
(:func:`ckptstore.publisher.publish`), so ``ckptstore.saved_model.load(URL)``
loads them.

What it guarantees:

* nothing unreadable is committed: every checkpoint (and a SavedModel's
  variables) is read back by TensorFlow's own reader, every tensor, before a
  byte goes up (TensorFlow checks each tensor's CRC32C as it reads it);
* nothing is overwritten or deleted at URL: a name committed there with the
  same content is skipped (re-running a push is safe), with other content it is
  refused, and files no manifest vouches for are never replaced unless they are
  ckptstore's own leftovers;
* a checkpoint push holds the run's writer lease, as a writer does, and never
  runs beside a live writer; a push killed mid-way leaves its uploads listed in
  the lease as in flight, so the next writer or ``ckptstore gc`` collects them.

This module is the command: its arguments, :func:`run` and the report (output
and exit status). What DIR holds and whether TensorFlow reads it is
:mod:`~ckptstore.cli.push_source`'s; what goes, against what URL holds,
:mod:`~ckptstore.cli.push_plan`'s; the uploading and committing
:mod:`~ckptstore.cli.push_upload`'s.

TensorFlow is imported inside :func:`run`: push reads tensors.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
import tempfile
from typing import Any

from ckptstore.backends.local import LocalBackend
from ckptstore.cli import common
from ckptstore.cli.push_plan import CONFLICT, IDENTICAL, INVALID, NOT_SELECTED, Outcome
from ckptstore.cli.push_source import CHECKPOINT, SAVED_MODEL, source_kind, versions
from ckptstore.cli.push_upload import push_checkpoints, push_saved_model
from ckptstore.remote import Remote

SUMMARY = "upload an existing TensorFlow checkpoint directory or SavedModel, committed"

DESCRIPTION = """\
Upload what plain TensorFlow wrote in DIR to URL, as ckptstore itself would have:
every file uploaded and verified, a manifest committed per artifact. This is how
an old run moves in: afterwards ckptstore.CheckpointManager(ckpt, URL) on any
machine restores the newest pushed checkpoint, and ckptstore ls/verify see them
committed.

DIR may be:
  * a checkpoint directory (tf.train.CheckpointManager, Checkpoint.save, or an
    Estimator's model.ckpt-1000): the complete checkpoints its "checkpoint"
    state file lists (all complete ones if it has none; --checkpoint picks).
    Each goes up as URL/<name>.*, committed by URL/<name>.manifest.json; then
    URL/checkpoint, TensorFlow's state file, lists the committed checkpoints,
    oldest first (what URL listed before, plus the pushed ones);
  * a SavedModel (DIR/saved_model.pb): committed at URL, saved_model.pb after
    the rest, as ckptstore.saved_model.save commits one;
  * a base of numbered SavedModels (TF Serving's DIR/1/, DIR/2/): each version
    committed at URL/<n>; ckptstore.saved_model.load(URL) loads the newest.

Before anything is sent, TensorFlow reads every checkpoint back (each tensor,
whose CRC32C TensorFlow checks): a truncated or corrupt one is refused and
named, the others are still pushed, and the exit status is 2.

Nothing at URL is ever overwritten or deleted. A name committed there with the
same content (size and CRC32C of every file) is skipped, so running the same
push again is safe; with other content it is refused (exit 2). Pushing
checkpoints takes the run's writer lease (as a training run's manager does, and
releases it after): if a live process writes URL, nothing is pushed (exit 2). A
push killed mid-way leaves nothing that looks committed: its half-sent files
are listed in the lease as in flight, and the next writer or "ckptstore gc"
deletes them."""

EPILOG = """\
examples:
  ckptstore push ./runs/run-7 s3://bucket/runs/run-7       every checkpoint its state file lists
  ckptstore push ./model_dir gs://bucket/est --checkpoint model.ckpt-20000   one of them
  ckptstore push ./export gs://bucket/models/ranker        a SavedModel
  ckptstore push ./serving/ranker s3://bucket/serving/ranker   TF Serving's versions 1, 2, ...
  ckptstore push ./runs/run-7 /mnt/backup/run-7            a local path (or file://) works too
  ckptstore push --json ./runs/run-7 s3://bucket/run-7 | jq '.pushed[].name'

exit status: 0 everything selected is committed at URL (pushed now, or there
already with the same content), 1 an uploaded file did not verify, 2 a usage or
access error: DIR is not a checkpoint directory or SavedModel, a checkpoint in
DIR is incomplete or unreadable, URL holds a different artifact of the same
name, a live writer holds the run, no such bucket, refused credentials."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.command_parser(
        subparsers, "push", summary=SUMMARY, description=DESCRIPTION, epilog=EPILOG
    )
    parser.add_argument(
        "source",
        metavar="DIR",
        help="a local TensorFlow checkpoint directory, SavedModel, or base of numbered SavedModels",
    )
    common.add_url_argument(parser, "where to push it: s3://, gs://, gdrive://, file://, a path")
    parser.add_argument(
        "--checkpoint",
        dest="checkpoints",
        action="append",
        metavar="NAME",
        help="push only this checkpoint of DIR (its prefix, e.g. ckpt-3 or model.ckpt-1000; "
        "repeatable). Default: every complete checkpoint DIR's state file lists",
    )
    return parser


# --- the command --------------------------------------------------------------------------


def _check_bucket(remote: Remote) -> None:
    """An object store's bucket must exist: say so before anything else is tried."""
    fs = remote.fs
    if remote.backend.needs_parent_dirs or not hasattr(fs, "split_path"):
        return
    bucket = fs.split_path(remote.root)[0]
    if bucket and not common.CLI_RETRY.call(
        lambda: fs.exists(bucket),
        is_transient=remote.backend.is_transient,
        what=f"look for the bucket of {remote.url}",
    ):
        raise common.CommandError(
            f"{remote.url}: bucket {bucket!r} does not exist or is not visible with these "
            "credentials; nothing was pushed. Create it, or check the URL and credentials."
        )


def _sub_remote(base: Remote, name: str, url: str) -> Remote:
    return Remote(base.backend, base.path(name), url)


def _import_tensorflow(verbose: int) -> Any:
    """TensorFlow, imported with its C++ start-up lines (oneDNN, absl) kept off stderr.

    stderr is for push's own messages; TensorFlow's native code writes there at
    import whatever ``TF_CPP_MIN_LOG_LEVEL`` says. What it wrote is shown if the
    import fails, and with ``-v``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        from ckptstore import staging

        return staging.tf
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            from ckptstore import staging

            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed or verbose:
                caught.seek(0)
                sys.stderr.write(caught.read().decode("utf-8", errors="replace"))
                sys.stderr.flush()
    return staging.tf


def run(args: argparse.Namespace) -> int:
    out = args.out
    source = args.source
    kind = source_kind(source)  # before anything is imported or opened: a typo answers at once
    if args.checkpoints and kind != CHECKPOINT:
        raise common.CommandError(
            f"--checkpoint picks checkpoints of a checkpoint directory; {source} is a "
            f"{'SavedModel' if kind == SAVED_MODEL else 'base of numbered SavedModels'}. "
            "Leave --checkpoint out to push it whole."
        )
    remote = common.open_remote(args)
    if isinstance(remote.backend, LocalBackend) and os.path.realpath(
        remote.root
    ) == os.path.realpath(source):
        raise common.CommandError(
            f"{source} and {remote.url} are the same directory; push copies DIR to another "
            "place. To have ckptstore vouch for checkpoints where they are, open a "
            "ckptstore.CheckpointManager on that directory with a staging_dir (it adopts them)."
        )
    tf = _import_tensorflow(args.verbose)
    _check_bucket(remote)
    outcome = Outcome()
    if kind == CHECKPOINT:
        push_checkpoints(args, remote, tf, outcome)
    elif kind == SAVED_MODEL:
        name = posixpath.basename(remote.url.rstrip("/")) or remote.url
        push_saved_model(args, tf, source, remote, name, None, outcome)
    else:
        found = versions(source)
        ignored = sorted(e for e in os.listdir(source) if e not in {str(v) for v in found})
        if ignored:
            out.note(f"not pushed (not a numbered SavedModel version): {', '.join(ignored)}")
        for version in sorted(found):
            url = f"{remote.url.rstrip('/')}/{version}"
            sub = _sub_remote(remote, str(version), url)
            if not push_saved_model(args, tf, found[version], sub, str(version), version, outcome):
                break
    return _report(args, kind, outcome)


def _report(args: argparse.Namespace, kind: str, outcome: Outcome) -> int:
    out = args.out
    url = args.redactor.url
    out.document(
        {
            "url": url,
            "dir": args.source,
            "kind": kind,
            "ok": not outcome.problems,
            "pushed": outcome.pushed,
            "skipped": outcome.skipped,
            "problems": outcome.problems,
            "state_file": outcome.state_file,
        }
    )
    for s in outcome.skipped:
        if kind == CHECKPOINT and s["status"] == INVALID:  # SavedModels said so as they went
            out.result(f"REFUSED  {s['name']}  ({s['reason']})")
        elif kind == CHECKPOINT and s["status"] == CONFLICT:
            out.result(f"CONFLICT {s['url']}  ({s['reason']})")
        elif s["status"] == NOT_SELECTED:
            out.detail(f"not pushed: {s['name']} ({s['reason']})")
    total = sum(p["bytes"] for p in outcome.pushed)
    what = "checkpoint" if kind == CHECKPOINT else "SavedModel"
    same = sum(1 for s in outcome.skipped if s["status"] == IDENTICAL)
    if outcome.pushed:
        summary = (
            f"pushed {common.plural(len(outcome.pushed), what)} ({common.size_text(total)}) "
            f"to {url}, each verified and committed"
        )
        if same:
            summary += f"; {same} more already there with the same content"
    elif same:
        summary = (
            f"nothing new to push: {common.plural(same, what)} already committed at {url} "
            "with the same content"
        )
    else:
        summary = f"nothing was pushed to {url}"
    out.note(summary)
    if outcome.state_file:
        out.note(
            f"{url}/checkpoint lists {', '.join(outcome.state_file)}: "
            f"ckptstore.CheckpointManager(ckpt, {url!r}) restores {outcome.state_file[-1]}"
        )
    for problem in outcome.problems:
        out.error(f"ckptstore push: {problem}")
    if outcome.problems:
        fine = f"; the rest is committed at {url}" if outcome.pushed or same else ""
        out.error(
            f"ckptstore push: {common.plural(len(outcome.problems), 'problem')}{fine}. "
            "Running the same push again after fixing them is safe: what is committed already "
            "is skipped."
        )
    return outcome.status
