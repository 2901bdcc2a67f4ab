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

TensorFlow is imported inside :func:`run`: push reads tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import posixpath
import re
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from fsspec.callbacks import Callback

from ckptstore import __version__, artifact, publisher
from ckptstore import manifest as mf
from ckptstore.backends.local import LocalBackend
from ckptstore.cli import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE, common
from ckptstore.errors import OwnershipError, VerificationError
from ckptstore.manifest import Manifest
from ckptstore.ownership import Holder, Lease, Liveness, judge
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy

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

#: a checkpoint's data shard: ``<prefix>.data-00000-of-00002``
_SHARD = re.compile(r"(?P<prefix>.+)\.data-(?P<k>[0-9]+)-of-(?P<n>[0-9]+)")
#: TF Serving's version directories: non-negative integers
_VERSION = re.compile(r"[0-9]+")
_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
#: what TensorFlow writes at the top of an export directory (as ckptstore.saved_model knows it)
_TENSORFLOW_ENTRIES = ("saved_model.pb", "saved_model.pbtxt", "variables", "fingerprint.pb")
#: the step, where a checkpoint keeps one as a scalar integer (Estimator, or Checkpoint(step=))
_STEP_KEYS = (
    "global_step",
    "step/.ATTRIBUTES/VARIABLE_VALUE",
    "global_step/.ATTRIBUTES/VARIABLE_VALUE",
)
#: uploads in parallel per artifact (the library's default upload_concurrency)
_CONCURRENCY = 4

# Statuses of what was not pushed (``skipped[].status`` in --json).
IDENTICAL = "identical"  # committed at URL with the same content: fine (exit 0)
NOT_SELECTED = "not_selected"  # in DIR, but not asked for (fine)
CONFLICT = "conflict"  # URL holds a different artifact of that name (exit 2)
INVALID = "invalid"  # incomplete, or TensorFlow cannot read it (exit 2)
FAILED = "failed"  # the upload failed (exit 2) or did not verify (exit 1)


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


# --- what DIR holds -----------------------------------------------------------------------


@dataclasses.dataclass
class LocalCheckpoint:
    """One checkpoint prefix found in DIR."""

    name: str
    files: list[str]
    #: why it is not a complete checkpoint (``None``: complete)
    incomplete: str | None
    #: listed in DIR's ``checkpoint`` state file
    listed: bool
    timestamp: float
    number: int | None
    step: int | None = None


@dataclasses.dataclass
class Outcome:
    """What became of everything push looked at; becomes the output and the exit status."""

    pushed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    integrity: bool = False  # an uploaded file did not verify
    state_file: list[str] | None = None  # what URL's state file lists (checkpoints only)

    def skip(self, name: str, url: str | None, status: str, reason: str) -> None:
        self.skipped.append({"name": name, "url": url, "status": status, "reason": reason})
        if status not in (IDENTICAL, NOT_SELECTED):
            self.problems.append(f"{url or name}: {reason}")

    @property
    def status(self) -> int:
        if self.integrity:
            return EXIT_INTEGRITY
        return EXIT_USAGE if self.problems else EXIT_OK


def _found_text(path: str) -> str:
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return "nothing readable"
    if not entries:
        return "nothing: it is empty"
    shown = [e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in entries[:10]]
    more = f", and {len(entries) - 10} more" if len(entries) > 10 else ""
    return ", ".join(shown) + more


def _not_pushable(source: str, why: str) -> common.CommandError:
    return common.CommandError(
        f"{source} is not a TensorFlow checkpoint directory or a SavedModel: {why}. Nothing "
        "was pushed. Give the directory tf.train.CheckpointManager or tf.train.Checkpoint.save "
        "wrote (it holds <prefix>.index and <prefix>.data-* files), or a directory "
        "tf.saved_model.save wrote (it holds saved_model.pb), or TF Serving's base of numbered "
        "versions (DIR/1/saved_model.pb, ...)."
    )


def _is_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _GRAPH_FILES)


def _versions(path: str) -> dict[int, str]:
    """TF Serving's numbered version directories under ``path`` that hold a SavedModel."""
    found = {}
    for entry in os.listdir(path):
        sub = os.path.join(path, entry)
        if _VERSION.fullmatch(entry) and os.path.isdir(sub) and _is_saved_model(sub):
            found[int(entry)] = sub
    return found


def _number_of(name: str) -> int | None:
    """The checkpoint number TensorFlow appends: ``ckpt-7`` -> 7, ``model.ckpt-1000`` -> 1000."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if "-" in name and tail.isdigit() else None


def _read_dir_state(source: str) -> tuple[dict[str, float], float | None]:
    """``{name: timestamp}`` (oldest first) and ``last_preserved_timestamp`` of DIR's state file.

    A missing or unreadable state file gives ``({}, None)``: then every complete
    checkpoint is pushed, timed by its index file.
    """
    from ckptstore import staging

    path = os.path.join(source, "checkpoint")
    if not os.path.isfile(path):
        return {}, None
    with open(path, encoding="utf-8", errors="replace") as f:
        state = staging.parse_state_text(f.read())
    if state is None:
        return {}, None
    names = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
    if not names and state.model_checkpoint_path:
        names = [os.path.basename(state.model_checkpoint_path)]
    stamps = list(state.all_model_checkpoint_timestamps)
    listed = {n: (stamps[i] if i < len(stamps) else None) for i, n in enumerate(names)}
    return listed, state.last_preserved_timestamp or None  # type: ignore[return-value]


def find_checkpoints(source: str, listed: dict[str, float | None]) -> list[LocalCheckpoint]:
    """Every checkpoint prefix in ``source`` (complete or not), oldest first."""
    files = sorted(f for f in os.listdir(source) if os.path.isfile(os.path.join(source, f)))
    prefixes = {f[: -len(".index")] for f in files if f.endswith(".index")}
    shards: dict[str, list[tuple[int, int]]] = {}
    for f in files:
        m = _SHARD.fullmatch(f)
        if m is not None:
            shards.setdefault(m["prefix"], []).append((int(m["k"]), int(m["n"])))
            prefixes.add(m["prefix"])
    prefixes |= {n for n in listed if os.path.isfile(os.path.join(source, n + ".index"))}
    found = []
    for name in prefixes | set(listed):
        own = mf.checkpoint_files(source, name) if name in prefixes else []
        got = shards.get(name, [])
        totals = {n for _, n in got}
        why = None
        if name + ".index" not in own:
            why = f"it has no {name}.index file" if own else "none of its files are in DIR"
        elif not got:
            why = f"it has no {name}.data-* file"
        elif len(totals) != 1:
            why = "its data files disagree on how many shards there are"
        else:
            (total,) = totals
            missing = sorted(set(range(total)) - {k for k, _ in got})
            if missing:
                names = ", ".join(f"{name}.data-{k:05d}-of-{total:05d}" for k in missing[:3])
                why = f"data shard{'s' if len(missing) > 1 else ''} {names} missing"
        stamp = listed.get(name)
        if stamp is None:
            index = os.path.join(source, name + ".index")
            stamp = os.path.getmtime(index) if os.path.isfile(index) else 0.0
        found.append(
            LocalCheckpoint(
                name=name,
                files=own,
                incomplete=why,
                listed=name in listed,
                timestamp=float(stamp),
                number=_number_of(name),
            )
        )
    return sorted(found, key=lambda c: (c.timestamp, c.number or 0, c.name))


# --- reading it with TensorFlow -----------------------------------------------------------


def read_checkpoint(tf: Any, prefix: str) -> tuple[str | None, int | None]:
    """Read every tensor of the checkpoint at ``prefix``: ``(problem or None, step or None)``.

    TensorFlow's reader checks each tensor's CRC32C (kept in the index) as it
    reads it, so a truncated or altered data file fails here, not after it was
    committed as verified. Tensors are read one at a time: memory holds the
    largest, not the checkpoint.
    """
    step = None
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
        for key in sorted(shapes):
            value = reader.get_tensor(key)
            if key in _STEP_KEYS and step is None and not shapes[key] and dtypes[key].is_integer:
                step = int(value)
    except Exception as exc:  # DataLossError, NotFoundError, OutOfRangeError, ...
        text = str(exc).strip().splitlines()
        return f"TensorFlow cannot read it ({type(exc).__name__}: {text[0] if text else ''})", None
    return None, step


def check_saved_model(tf: Any, path: str) -> str | None:
    """Why the SavedModel at ``path`` cannot be loaded, or ``None``: its graph parses and
    its variables (a checkpoint) read back."""
    if not tf.saved_model.contains_saved_model(path):
        return "it holds no saved_model.pb"
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        pb = os.path.join(path, "saved_model.pb")
        if os.path.isfile(pb):
            with open(pb, "rb") as f:
                proto.ParseFromString(f.read())
        else:
            with open(os.path.join(path, "saved_model.pbtxt"), encoding="utf-8") as f:
                text_format.Parse(f.read(), proto)
    except Exception as exc:
        return f"its saved_model.pb does not parse ({type(exc).__name__}: {exc})"
    if not proto.meta_graphs:
        return "its saved_model.pb holds no MetaGraph"
    variables = os.path.join(path, "variables", "variables")
    if os.path.isfile(variables + ".index"):
        problem, _ = read_checkpoint(tf, variables)
        if problem is not None:
            return f"its variables cannot be read: {problem}"
    return None


# --- the remote ---------------------------------------------------------------------------


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


def _difference(local: Manifest, stored: Manifest) -> str | None:
    """How two manifests of one name differ in content (``None``: same files, sizes, CRC32Cs)."""
    mine = {e.name: e for e in local.files}
    theirs = {e.name: e for e in stored.files}
    if set(mine) != set(theirs):
        only = sorted(set(mine) ^ set(theirs))
        return (
            f"other files ({', '.join(only[:3])} {'is' if len(only) == 1 else 'are'} only in one)"
        )
    for name in sorted(mine):
        a, b = mine[name], theirs[name]
        if a.size != b.size:
            return f"{name} is {b.size} bytes there, {a.size} in DIR"
        if a.crc32c != b.crc32c:
            return f"{name} has crc32c {b.crc32c} there, {a.crc32c} in DIR"
    return None


def _conflict_fix(url: str) -> str:
    return (
        f"push does not overwrite it: push to another URL, or delete {url} there first "
        "(its manifest, then its files) and push again"
    )


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


def _sub_remote(base: Remote, name: str, url: str) -> Remote:
    return Remote(base.backend, base.path(name), url)


# --- pushing checkpoints ------------------------------------------------------------------


def _select(
    args: argparse.Namespace, found: list[LocalCheckpoint], has_state: bool, outcome: Outcome
) -> list[LocalCheckpoint]:
    """The checkpoints to push; the others are reported (and refused ones counted)."""
    by_name = {c.name: c for c in found}
    source = args.source
    if args.checkpoints:
        wanted = []
        for given in args.checkpoints:
            name = os.path.basename(given.rstrip("/"))
            name = name[: -len(".index")] if name.endswith(".index") else name
            if name not in by_name:
                known = ", ".join(c.name for c in found) or "none"
                raise common.CommandError(
                    f"{source} holds no checkpoint {name!r} (it holds: {known}). Give a "
                    "prefix as TensorFlow names it, e.g. --checkpoint ckpt-3; nothing was pushed."
                )
            if by_name[name] not in wanted:
                wanted.append(by_name[name])
        chosen = {c.name for c in wanted}
    elif has_state:
        chosen = {c.name for c in found if c.listed}
    else:
        chosen = {c.name for c in found if c.incomplete is None}
    selected = []
    for c in found:
        if c.name in chosen:
            if c.incomplete is None:
                selected.append(c)
            else:
                outcome.skip(
                    c.name,
                    None,
                    INVALID,
                    f"incomplete in {source}: {c.incomplete}; not pushed (TensorFlow cannot "
                    "restore it either)",
                )
        elif c.incomplete is not None:
            outcome.skip(
                c.name,
                None,
                NOT_SELECTED,
                f"incomplete in {source} ({c.incomplete}) and not listed in its state file: "
                "what a save cut short leaves; TensorFlow ignores it too",
            )
        else:
            how = (
                "not among the --checkpoint names given"
                if args.checkpoints
                else f"not listed in {source}'s checkpoint state file (retired or preserved "
                f"by TensorFlow); push it with --checkpoint {c.name}"
            )
            outcome.skip(c.name, None, NOT_SELECTED, how)
    return selected


def _classify(
    remote: Remote,
    call: artifact.Call,
    manifests: dict[str, Manifest],
    leftovers: set[str],
    outcome: Outcome | None,
) -> tuple[list[str], list[str], list[str]]:
    """Sort the checkpoints to push by what URL holds: ``(to upload, identical, conflicting)``.

    ``leftovers``: names ckptstore's last writer was uploading when it stopped
    (its lease's in flight); their files may be replaced. Conflicts are recorded
    in ``outcome`` when one is given.
    """
    names = call("list", remote.list_names)
    stored = call(
        "read the manifests",
        lambda: remote.read_manifests([n for n in manifests if mf.manifest_name(n) in names]),
    )
    upload, identical, conflicting = [], [], []
    for name, local in manifests.items():
        url = f"{remote.url.rstrip('/')}/{name}"
        there = stored.get(name)
        if isinstance(there, Manifest):
            diff = _difference(local, there)
            if diff is None:
                identical.append(name)
                continue
            conflicting.append(name)
            if outcome is not None:
                outcome.skip(
                    name,
                    url,
                    CONFLICT,
                    f"already committed there with other content ({diff}); {_conflict_fix(url)}",
                )
            continue
        if there is not None:  # a manifest that fails validation: not ours to replace
            conflicting.append(name)
            if outcome is not None:
                outcome.skip(
                    name,
                    url,
                    CONFLICT,
                    f"holds an invalid manifest of that name ({there}); {_conflict_fix(url)}",
                )
            continue
        data = remote.data_files_of(name, names)
        if data and name not in leftovers:
            conflicting.append(name)
            if outcome is not None:
                outcome.skip(
                    name,
                    url,
                    CONFLICT,
                    f"holds files of that name that no manifest vouches for "
                    f"({', '.join(data[:3])}): written by plain TensorFlow or someone else, "
                    f"not ckptstore. {_conflict_fix(url)}",
                )
            continue
        upload.append(name)
    return upload, identical, conflicting


def _state_plan(
    remote: Remote,
    call: artifact.Call,
    ours: list[str],
    last_preserved: float | None,
) -> tuple[str | None, list[str]]:
    """URL's new state-file text (``None``: unchanged) and the names it lists, oldest first.

    What URL's state file listed and is committed stays listed (a checkpoint a
    run preserved with keep_checkpoint_every_n_hours stays unlisted, as TensorFlow
    keeps it); the pushed and already-identical names join them, ordered by time.
    """
    from ckptstore import staging

    names = call("list", remote.list_names)
    committed = call(
        "read the manifests", lambda: remote.read_manifests(remote.committed_names(names))
    )
    good = {n: m for n, m in committed.items() if isinstance(m, Manifest)}
    current = call("read the state file", remote.read_state_text)
    state = staging.parse_state_text(current) if current else None
    entries: dict[str, float] = {}
    if state is not None:
        paths = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
        for name in paths:
            if name in good:
                entries[name] = good[name].timestamp
    for name in ours:
        if name in good:
            entries[name] = good[name].timestamp
    if not entries:
        return None, []
    order = sorted(entries, key=lambda n: (entries[n], good[n].number or 0, n))
    if state is not None and state.last_preserved_timestamp:
        preserved = state.last_preserved_timestamp
    elif last_preserved is not None:
        preserved = last_preserved
    else:
        preserved = min(entries.values()) - 1.0  # as a manager starting on the remote assumes
    text = staging.state_text(order, [entries[n] for n in order], preserved)
    return (None if text == current else text), order


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
    listed, last_preserved = _read_dir_state(source)
    found = find_checkpoints(source, listed)
    if args.checkpoints is None and listed and not any(c.listed for c in found):
        raise common.CommandError(
            f"{source}'s checkpoint state file lists {', '.join(listed)}, but none of their "
            "files are in it; nothing was pushed. Give --checkpoint NAME for the checkpoints it "
            f"does hold ({', '.join(c.name for c in found) or 'none'})."
        )
    selected = _select(args, found, bool(listed), outcome)

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
    upload, identical, _ = _classify(remote, read, manifests, leftovers, None)
    ours = [n for n in manifests if n in upload or n in identical]
    new_state, _ = _state_plan(remote, read, ours, last_preserved)
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
        upload, identical, _ = _classify(remote, read, manifests, leftovers, outcome)
        if lease is not None:
            # Carried over: what the last writer left half-sent stays listed as in flight,
            # so the next writer or ckptstore gc still knows it is a leftover.
            for name in sorted(leftovers - set(upload)):
                if name not in identical:
                    read("renew the writer lease", lambda n=name: lease.mark_in_flight(n))
        for name in identical:
            url = f"{remote.url.rstrip('/')}/{name}"
            outcome.skip(name, url, IDENTICAL, "already committed there with the same content")
            out.result(f"skipped  {url}  (committed there already, same content)")
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
            text, order = _state_plan(remote, read, ours, last_preserved)
            if text is not None:
                read("renew the writer lease", lease.renew)
                read("write the state file", lambda: remote.write_state_text(text))
            outcome.state_file = order
        else:
            outcome.state_file = _state_plan(remote, read, ours, last_preserved)[1]
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

    Returns whether to go on with the next one: yes after a file that did not
    verify (that checkpoint's problem), no after the remote failed (the next
    would fail the same way, after the same retries).
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
    except VerificationError as exc:
        outcome.integrity = True
        outcome.skip(name, url, FAILED, f"not committed: {args.redactor.describe(exc)}")
        args.out.result(f"FAILED   {url}  (did not verify; not committed)")
        return True
    except OwnershipError:
        raise  # the run was taken over: push nothing more
    except Exception as exc:
        outcome.skip(name, url, FAILED, f"not committed: {args.redactor.describe(exc)}")
        args.out.result(f"FAILED   {url}  (not committed)")
        return False
    finally:
        transfer.finish(ok=ok)
    lease.mark_done(name)
    outcome.pushed.append(
        {
            "name": name,
            "url": url,
            "kind": mf.CHECKPOINT,
            "number": manifest.number,
            "step": manifest.step,
            "time": manifest.timestamp,
            "bytes": manifest.total_bytes,
            "files": [e.name for e in manifest.files],
        }
    )
    step = f"; step {manifest.step}" if manifest.step is not None else ""
    args.out.result(
        f"pushed   {url}  ({common.plural(len(manifest.files), 'file')}, "
        f"{common.size_text(manifest.total_bytes)}{step})"
    )
    return True


# --- pushing SavedModels ------------------------------------------------------------------


def _own_files(path: str) -> list[str]:
    """The export's files, relative; ckptstore's own (a manifest, a marker) are not part of it."""
    return [
        f
        for f in mf.tree_files(path)
        if not f.endswith(mf.MANIFEST_SUFFIX) and not f.endswith(publisher.PENDING_SUFFIX)
    ]


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
    files = _own_files(local_dir)
    read = artifact.caller(remote, args.redactor, common.CLI_RETRY)
    names = read("list", remote.list_names)
    existing = publisher.read_committed(remote, mf.SAVED_MODEL_NAME, read)
    if existing is not None:
        local = mf.describe_files(
            local_dir,
            mf.SAVED_MODEL_NAME,
            files,
            kind=mf.SAVED_MODEL,
            timestamp=time.time(),
            with_md5=remote.backend.needs_md5,
        )
        diff = _difference(local, existing)
        if diff is None:
            outcome.skip(name, url, IDENTICAL, "already committed there with the same content")
            args.out.result(f"skipped  {url}  (committed there already, same content)")
        else:
            outcome.skip(
                name,
                url,
                CONFLICT,
                f"a SavedModel is already committed there with other content ({diff}); "
                f"{_conflict_fix(url)}",
            )
            args.out.result(f"CONFLICT {url}  (committed there with other content)")
        return True
    marked = publisher.pending_name(mf.SAVED_MODEL_NAME) in names
    theirs = [n for n in _TENSORFLOW_ENTRIES if n in names]
    if theirs and not marked:  # a SavedModel ckptstore did not write: the user's, never replaced
        outcome.skip(
            name,
            url,
            CONFLICT,
            f"already holds a SavedModel ckptstore did not write ({', '.join(theirs)}, no "
            f"{mf.manifest_name(mf.SAVED_MODEL_NAME)}); push does not overwrite it: push to "
            "another URL, or vouch for what is there with ckptstore.saved_model.adopt(URL)",
        )
        args.out.result(f"CONFLICT {url}  (holds a SavedModel ckptstore did not write)")
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
    except VerificationError as exc:
        outcome.integrity = True
        outcome.skip(name, url, FAILED, f"not committed: {args.redactor.describe(exc)}")
        args.out.result(f"FAILED   {url}  (did not verify; not committed)")
        return True
    except Exception as exc:
        outcome.skip(name, url, FAILED, f"not committed: {args.redactor.describe(exc)}")
        args.out.result(f"FAILED   {url}  (not committed)")
        return False
    finally:
        transfer.finish(ok=ok)
    outcome.pushed.append(
        {
            "name": name,
            "url": url,
            "kind": mf.SAVED_MODEL,
            "number": number,
            "step": None,
            "time": manifest.timestamp,
            "bytes": manifest.total_bytes,
            "files": [e.name for e in manifest.files],
        }
    )
    args.out.result(
        f"pushed   {url}  ({common.plural(len(manifest.files), 'file')}, "
        f"{common.size_text(manifest.total_bytes)})"
    )
    return True


def _named(redactor: Redactor, url: str) -> Redactor:
    """``redactor``'s secrets, showing ``url`` (a version's own URL) in messages."""
    import copy

    named = copy.copy(redactor)
    named.url = url
    return named


# --- the command --------------------------------------------------------------------------


def _source_kind(source: str) -> str:
    """``checkpoint``, ``saved_model`` or ``saved_model_versions``; or why DIR is neither."""
    if not os.path.exists(source):
        raise _not_pushable(source, "no such directory")
    if not os.path.isdir(source):
        raise _not_pushable(source, "it is a file, not a directory")
    if _is_saved_model(source):
        return "saved_model"
    try:
        entries = os.listdir(source)
    except OSError as exc:
        raise _not_pushable(source, f"it cannot be read ({exc.strerror or exc})") from None
    if any(e.endswith(".index") or _SHARD.fullmatch(e) for e in entries):
        return "checkpoint"
    if _versions(source):
        return "saved_model_versions"
    state = " (its checkpoint state file names checkpoints whose files are not there)"
    return_why = (
        "it holds no <prefix>.index file (TensorFlow's checkpoints), no saved_model.pb and no "
        "numbered SavedModel versions"
        + (state if "checkpoint" in entries else "")
        + f" (found: {_found_text(source)})"
    )
    raise _not_pushable(source, return_why)


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
    kind = _source_kind(source)  # before anything is imported or opened: a typo answers at once
    if args.checkpoints and kind != "checkpoint":
        raise common.CommandError(
            f"--checkpoint picks checkpoints of a checkpoint directory; {source} is a "
            f"{'SavedModel' if kind == 'saved_model' else 'base of numbered SavedModels'}. "
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
    if kind == "checkpoint":
        push_checkpoints(args, remote, tf, outcome)
    elif kind == "saved_model":
        name = posixpath.basename(remote.url.rstrip("/")) or remote.url
        push_saved_model(args, tf, source, remote, name, None, outcome)
    else:
        versions = _versions(source)
        ignored = sorted(e for e in os.listdir(source) if e not in {str(v) for v in versions})
        if ignored:
            out.note(f"not pushed (not a numbered SavedModel version): {', '.join(ignored)}")
        for version in sorted(versions):
            url = f"{remote.url.rstrip('/')}/{version}"
            sub = _sub_remote(remote, str(version), url)
            if not push_saved_model(
                args, tf, versions[version], sub, str(version), version, outcome
            ):
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
        if kind == "checkpoint" and s["status"] == INVALID:  # SavedModels said so as they went
            out.result(f"REFUSED  {s['name']}  ({s['reason']})")
        elif kind == "checkpoint" and s["status"] == CONFLICT:
            out.result(f"CONFLICT {s['url']}  ({s['reason']})")
        elif s["status"] == NOT_SELECTED:
            out.detail(f"not pushed: {s['name']} ({s['reason']})")
    total = sum(p["bytes"] for p in outcome.pushed)
    what = "checkpoint" if kind == "checkpoint" else "SavedModel"
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
