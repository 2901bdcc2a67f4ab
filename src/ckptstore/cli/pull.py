"""``ckptstore pull URL DEST``: a committed checkpoint, downloaded verified, for plain TensorFlow.

The download path is the library's own restore path
(:meth:`ckptstore.remote.Remote.download_verified`): every file lands under a
temporary name, its size and CRC32C are compared with the manifest, and only
when every file matched are they renamed into place. A checkpoint that fails is
refused as a whole: nothing of it is placed in DEST, the state file is left as
it was, and no older checkpoint is pulled instead (that would hand the user
other weights than the ones asked for, silently).

This module imports no TensorFlow (``ckptstore pull`` runs where TensorFlow is
not installed, and answers in a second), so it cannot use :mod:`ckptstore.restore`
or :mod:`ckptstore.staging`, which import it: the ``checkpoint`` state file is
read and written here by hand (:func:`read_state_paths`, :func:`state_text`).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import os
import re
import time
from typing import Any

from ckptstore import inventory as inv
from ckptstore import manifest as mf
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.cli import EXIT_INTEGRITY, EXIT_OK, common, ls
from ckptstore.errors import VerificationError
from ckptstore.manifest import Manifest
from ckptstore.remote import STATE_FILE, local_file_matches, local_path

SUMMARY = "download and verify a checkpoint into a directory plain TensorFlow reads"

DESCRIPTION = """\
Download one committed checkpoint of a run into DEST, verified, so that plain
TensorFlow reads it: tf.train.latest_checkpoint(DEST) returns it and
tf.train.Checkpoint(...).restore() or tf.train.load_checkpoint() load it. No
ckptstore is needed to read DEST afterwards.

URL is one run (the URL a ckptstore.CheckpointManager writes to). Without
--checkpoint the newest committed checkpoint is pulled; --checkpoint names one
(ckpt-7) or gives its number (7). A URL that is a SavedModel export (an
Exporter's base, or one version directory) pulls the newest version, or the one
--checkpoint numbers, into DEST itself (DEST then holds saved_model.pb and
variables/); a Keras file's URL (ckptstore.keras) pulls it to DEST/<name>.

Every file is checked against the checkpoint's manifest (size and CRC32C) before
anything is placed in DEST: it is downloaded under a temporary name and renamed
into place only once all files matched. A checkpoint that does not match is
refused: the command exits 1 naming it and the file, nothing of it is left in
DEST, DEST's state file is unchanged, and no older checkpoint is pulled instead.

TensorFlow's "checkpoint" state file in DEST is written last, atomically: the
pulled checkpoint becomes model_checkpoint_path, and the checkpoints it already
listed that are still in DEST stay listed. Files already in DEST that match the
manifest are not downloaded again; a file of the same name that differs is
replaced, once the new one is verified.

A progress bar (on stderr) shows the transfer when stdout is a terminal; none
with -q, or when stdout is a pipe or a file."""

EPILOG = """\
examples:
  ckptstore pull s3://bucket/runs/run-7 ./run-7           the newest checkpoint
  ckptstore pull s3://bucket/runs/run-7 ./run-7 --checkpoint ckpt-3
  ckptstore pull gs://bucket/run-7 ./run-7 --checkpoint 3   the same, by number
  ckptstore pull s3://bucket/runs/run-7/ckpt-3 ./run-7      an artifact's own URL, as ls prints it
  ckptstore pull s3://bucket/serving/ranker ./ranker        the newest SavedModel version
  ckptstore pull --json s3://bucket/runs/run-7 ./run-7 | jq -r .prefix

  then, in Python:  tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint("./run-7"))

exit status:
  0  pulled and verified (or already in DEST, matching)
  1  refused: a stored file is missing or differs from the manifest (each one is named);
     nothing of that checkpoint was placed in DEST
  2  a usage or access error: bad arguments, no such bucket, refused credentials, a URL
     with nothing committed, a URL above several runs, no checkpoint of that name or number"""

#: how many names an error message lists before it says "and N more"
_SHOWN = 12
#: ``--checkpoint 3`` in a run holding a checkpoint and a SavedModel version 3: the checkpoint
_KIND_PREFERENCE = {mf.CHECKPOINT: 0, mf.SAVED_MODEL: 1, mf.KERAS: 2}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.command_parser(
        subparsers, "pull", summary=SUMMARY, description=DESCRIPTION, epilog=EPILOG
    )
    common.add_url_argument(
        parser, "one run's URL (or a SavedModel export's, a Keras file's, or one checkpoint's)"
    )
    parser.add_argument(
        "dest", metavar="DEST", help="the local directory to pull into (created if missing)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="NAME|NUMBER",
        help="the checkpoint to pull, by name (ckpt-7) or number (7); default: the newest "
        "committed one",
    )
    # ls.scan reads these; pull looks as deep as ls does, and never collects anything.
    parser.set_defaults(depth=inv.DEFAULT_DEPTH, min_age=inv.DEFAULT_MIN_AGE)
    return parser


# --- choosing what to pull ------------------------------------------------------------------


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _nothing_committed(found: inv.Inventory) -> common.CommandError:
    url = found.url_of("")
    leftovers = [a for a in found.artifacts() if not a.committed]
    if found.objects == 0:
        why = "nothing is stored there. Check the URL (ckptstore ls URL shows what a prefix holds)"
    elif leftovers:
        described = [f"{found.url_of(a.location)} ({a.status})" for a in leftovers]
        own = [a for a in leftovers if a.status != inv.UNMANAGED]
        why = f"only uncommitted items are there: {_listing(described)}. " + (
            "Nothing no manifest vouches for is pulled: an interrupted upload may be "
            "incomplete. ckptstore ls URL says why each one is not committed"
            + (", ckptstore gc collects ckptstore's leftovers" if own else "")
        )
        if not own:
            why += (
                "; checkpoints plain TensorFlow wrote are committed by a ckptstore "
                "CheckpointManager opened on that URL"
            )
    else:
        why = f"{found.objects} stored objects, none of them ckptstore's"
    return common.CommandError(f"nothing committed under {url}: {why}")


def choose_run(found: inv.Inventory, out: common.Output) -> inv.Run:
    """The one run URL names: the URL itself, or the only run below it with anything committed.

    Raises:
        common.CommandError: nothing committed, or several runs (exit 2).
    """
    runs = [r for r in found.runs if any(a.committed for a in r.artifacts)]
    if not runs:
        raise _nothing_committed(found)
    here = next((r for r in runs if r.path == ""), None)
    if here is not None:
        return here
    if len(runs) > 1:
        urls = [found.url_of(r.path) for r in runs]
        raise common.CommandError(
            f"{found.url_of('')} holds {len(runs)} runs with committed artifacts: "
            f"{_listing(urls)}. Pull one of them: ckptstore pull {urls[0]} DEST"
        )
    out.note(f"pulling from {found.url_of(runs[0].path)}, the one run under {found.url_of('')}")
    return runs[0]


def choose_artifact(
    found: inv.Inventory, run: inv.Run, wanted: str | None, out: common.Output
) -> inv.Artifact:
    """The artifact ``--checkpoint`` names in ``run``, else its newest committed checkpoint.

    Raises:
        common.CommandError: no committed artifact of that name or number (exit 2),
            naming what the run does hold.
    """
    committed = [a for a in run.artifacts if a.committed]
    run_url = found.url_of(run.path)
    if wanted is None:
        # Checkpoints first, then SavedModel versions, then Keras files: the newest of the
        # first kind the run holds (by number; Keras files, which have none, by time).
        chosen = inv.newest_committed(inv.Inventory(found.remote, [run], found.objects))[0]
        newer = [
            a
            for a in run.artifacts
            if not a.committed
            and a.kind == chosen.kind
            and a.number is not None
            and chosen.number is not None
            and a.number > chosen.number
        ]
        for a in newer:
            out.note(
                f"note: {found.url_of(a.location)} is newer but not committed ({a.status}): "
                f"pulling {chosen.name}, the newest committed"
            )
        return chosen

    text = wanted.strip()
    matches = [a for a in committed if a.name == text]
    if not matches and text.isdigit():
        matches = [a for a in committed if a.number == int(text)]
    if matches:
        return min(matches, key=lambda a: _KIND_PREFERENCE.get(a.kind, 9))

    what = ", ".join(a.name for a in committed)
    named = [
        a
        for a in run.artifacts
        if not a.committed and (a.name == text or (text.isdigit() and a.number == int(text)))
    ]
    if named:
        a = named[0]
        raise common.CommandError(
            f"{found.url_of(a.location)} is not committed ({a.status}: {a.reason}), so it "
            f"cannot be pulled verified. Committed in {run_url}: {what}"
        )
    raise common.CommandError(
        f"no committed checkpoint {text!r} in {run_url}. Committed there: {what}. "
        "Give one of those names, or its number, to --checkpoint"
    )


# --- the state file (by hand: no TensorFlow here) -------------------------------------------

# TensorFlow's state file is a CheckpointState protocol buffer in text format, written here
# by hand so that pull imports no TensorFlow (its proto module comes only with it). Lines:
#   model_checkpoint_path: "ckpt-7"              what tf.train.latest_checkpoint returns
#   all_model_checkpoint_paths: "ckpt-6"         oldest first, the latest last
#   all_model_checkpoint_timestamps: 1.7e9       one per path: a tf.train.CheckpointManager
#                                                opened on the directory only manages paths
#                                                that have one (it zips the two lists)
#   last_preserved_timestamp: 1.7e9              kept as found
# Paths are relative to the directory, as TensorFlow writes them, so DEST can be moved.
_STRING_LINE = re.compile(
    r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"\s*$'
)
_NUMBER_LINE = re.compile(
    r"^\s*(all_model_checkpoint_timestamps|last_preserved_timestamp)\s*:\s*([-+0-9.eE]+|inf|nan)\s*$"
)


@dataclasses.dataclass
class StateFile:
    """What :func:`read_state` found in a ``checkpoint`` state file."""

    paths: list[str]  # all_model_checkpoint_paths, as written, model_checkpoint_path last
    timestamps: list[float | None]  # one per path; None where the file had none for it
    last_preserved: float | None = None


def _unquote(escaped: str) -> str:
    """A text-format string's content: C escapes (octal for UTF-8 bytes) undone."""
    raw, _ = codecs.escape_decode(escaped.encode("utf-8"))
    return raw.decode("utf-8", errors="replace")


def _quote(text: str) -> str:
    """``text`` as a text-format string literal, as protobuf writes it."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def read_state(directory: str) -> StateFile:
    """``directory``'s state file (empty when there is none, or it is not one)."""
    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8", errors="replace") as f:
            text = f.read(mf.MAX_MANIFEST_BYTES)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return StateFile([], [])
    latest, listed, stamps, preserved = None, [], [], None
    for line in text.splitlines():
        if (match := _STRING_LINE.match(line)) is not None:
            if match.group(1) == "model_checkpoint_path":
                latest = _unquote(match.group(2))
            else:
                listed.append(_unquote(match.group(2)))
        elif (match := _NUMBER_LINE.match(line)) is not None:
            try:
                value = float(match.group(2))
            except ValueError:
                continue
            if match.group(1) == "last_preserved_timestamp":
                preserved = value
            else:
                stamps.append(value)
    if latest is not None and latest not in listed:  # TensorFlow keeps the latest last
        listed.append(latest)
    aligned = len(stamps) == len(listed)
    timestamps: list[float | None] = list(stamps) if aligned else [None] * len(listed)
    return StateFile(listed, timestamps, preserved)


def state_text(paths: list[str], timestamps: list[float], last_preserved: float | None) -> str:
    """A state file listing ``paths`` (oldest first); the last is ``model_checkpoint_path``."""
    lines = [f"model_checkpoint_path: {_quote(paths[-1])}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in paths]
    lines += [f"all_model_checkpoint_timestamps: {float(t)!r}" for t in timestamps]
    if last_preserved is not None:
        lines.append(f"last_preserved_timestamp: {float(last_preserved)!r}")
    return "\n".join(lines) + "\n"


def _resolved(directory: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(directory, path))


def _mtime(prefix: str) -> float:
    try:
        return os.path.getmtime(prefix + ".index")
    except OSError:
        return time.time()


def write_state(directory: str, name: str, timestamp: float) -> list[str]:
    """Make ``name`` the latest checkpoint of ``directory``'s state file; return its list.

    Entries already listed whose checkpoint is still in the directory stay (in
    their order, as written, with their timestamps); ``name``, relative, goes
    last with ``timestamp`` (when TensorFlow saved it). Written to a temporary
    name and renamed over the old file, so a reader (or a crash) sees the old
    file or the new one, never half of one.
    """
    pulled = os.path.normpath(os.path.join(directory, name))
    found = read_state(directory)
    paths, stamps = [], []
    seen = {pulled}
    for path, stamp in zip(found.paths, found.timestamps):
        where = _resolved(directory, path)
        if where in seen or not os.path.exists(where + ".index"):
            continue
        seen.add(where)
        paths.append(path)
        stamps.append(stamp if stamp is not None else _mtime(where))
    paths.append(name)
    stamps.append(timestamp if timestamp > 0 else _mtime(pulled))
    target = os.path.join(directory, STATE_FILE)
    tmp = f"{target}{TEMP_MARKER}{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(state_text(paths, stamps, found.last_preserved))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return paths


# --- pulling --------------------------------------------------------------------------------


def _target(dest: str, a: inv.Artifact) -> str:
    """What to load after the pull: the checkpoint prefix, the SavedModel or the Keras file."""
    assert a.manifest is not None
    if a.kind == mf.SAVED_MODEL:
        return dest
    return os.path.join(dest, a.manifest.checkpoint)


def _how_to_load(dest: str, a: inv.Artifact, prefix: str) -> str:
    if a.kind == mf.CHECKPOINT:
        return f"tf.train.latest_checkpoint({dest!r}) returns {prefix}"
    if a.kind == mf.SAVED_MODEL:
        return f"load it with tf.saved_model.load({dest!r})"
    return f"load it with keras.models.load_model({prefix!r})"


def _refused(
    args: argparse.Namespace,
    found: inv.Inventory,
    a: inv.Artifact,
    exc: BaseException,
) -> list[str]:
    """The problems behind a failed download, naming each file (verify's words)."""
    if isinstance(exc, VerificationError):
        return [args.redactor.scrub(str(exc))]
    checks = inv.verify_artifact(found, a, retry=common.CLI_RETRY, redactor=args.redactor)
    problems = [c.problem for c in checks if c.problem is not None]
    return problems or [f"a file it lists is missing ({args.redactor.describe(exc)})"]


def run(args: argparse.Namespace) -> int:
    out = args.out
    found = ls.scan(args)
    run_ = choose_run(found, out)
    a = choose_artifact(found, run_, args.checkpoint, out)
    assert a.manifest is not None
    manifest: Manifest = a.manifest
    url = found.url_of(a.location)

    dest = os.path.abspath(args.dest)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise common.CommandError(
            f"cannot use {args.dest} as DEST: {exc.strerror or exc}. Give a directory "
            "(created if missing) you can write to"
        ) from None

    # Files already in DEST that match are kept as they are (a second pull is free).
    missing = [
        e
        for e in manifest.files
        if not local_file_matches(e, local_path(dest, manifest.local_name(e)))
    ]
    fetched = {e.name for e in missing}
    present = [e.name for e in manifest.files if e.name not in fetched]
    remote = inv.sub_remote(found.remote, a.directory)
    total = sum(e.size for e in missing)
    doc = common.artifact_json(found, a)
    doc.update(
        dest=dest,
        prefix=_target(dest, a),
        downloaded=[e.name for e in missing],
        already_present=present,
        state_file=None,
    )

    if missing:
        todo = dataclasses.replace(manifest, files=tuple(missing))
        transfer = common.transfer(args, f"pull {a.name}", total)
        ok = False
        try:
            common.CLI_RETRY.call(
                lambda: remote.download_verified(todo, dest, progress=transfer.file),
                is_transient=remote.backend.is_transient,
                what=f"download {url}",
                scrub=args.redactor.scrub,
            )
            ok = True
        except (VerificationError, FileNotFoundError) as exc:
            changed = inv.changed_since_scan(found, a)
            if changed is not None:  # a live writer retired or re-saved it: not damage
                raise common.CommandError(
                    f"{url} was {changed}; nothing of it was placed in {dest}. Run the pull "
                    "again to get the run's current newest checkpoint"
                ) from None
            return _refuse(args, found, a, url, dest, doc, _refused(args, found, a, exc))
        finally:
            transfer.finish(ok=ok)

    if a.kind == mf.CHECKPOINT:
        write_state(dest, manifest.checkpoint, manifest.timestamp)
        doc["state_file"] = os.path.join(dest, STATE_FILE)
    doc.update(ok=True, problems=[])
    out.document(doc)

    step = f"step {a.step}, " if a.step is not None else ""
    got = (
        f"{len(missing)} downloaded, {len(present)} already in DEST"
        if present
        else f"{common.plural(len(missing), 'file')}"
    )
    out.result(
        f"pulled  {url} -> {doc['prefix']}  ({a.kind}, {step}{got}, "
        f"{common.size_text(a.bytes)}; size and CRC32C of every file verified)"
    )
    for e in manifest.files:
        out.detail(f"          {e.name}: {'kept' if e.name in present else 'downloaded'}")
    out.note(_how_to_load(dest, a, doc["prefix"]))
    return EXIT_OK


def _refuse(
    args: argparse.Namespace,
    found: inv.Inventory,
    a: inv.Artifact,
    url: str,
    dest: str,
    doc: dict[str, Any],
    problems: list[str],
) -> int:
    """Report a checkpoint that failed verification: exit 1, nothing of it in DEST."""
    out = args.out
    doc.update(ok=False, problems=problems, downloaded=[])
    out.document(doc)
    out.result(
        f"REFUSED {url}  ({common.plural(len(a.files), 'file')}, {common.size_text(a.bytes)})"
    )
    for problem in problems:
        out.result(f"          {problem}")
    older = [
        b.name
        for b in found.artifacts()
        if b.committed and b.run == a.run and b.kind == a.kind and b is not a
    ]
    hint = (
        f" Other committed ones ({_listing(older)}) may be intact: ckptstore verify --all "
        f"{found.url_of(a.run)} checks them; pull one by name with --checkpoint."
        if older
        else ""
    )
    state = " and its state file is unchanged" if a.kind == mf.CHECKPOINT else ""
    out.error(
        f"ckptstore pull: refused {url}: {'; '.join(problems)}. Nothing of it was placed in "
        f"{dest}{state}. No older one was pulled instead.{hint}"
    )
    return EXIT_INTEGRITY
