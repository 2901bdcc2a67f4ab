"""What ``ckptstore push`` sends: DIR's checkpoints against what URL already holds.

Which of DIR's checkpoints are asked for (:func:`select`); for each, whether URL
holds it committed with the same content (skipped: re-running a push is safe),
something else of that name (refused: push never overwrites), or nothing
ckptstore would not replace (uploaded) (:func:`classify`,
:func:`classify_saved_model`); and what URL's ``checkpoint`` state file lists
afterwards (:func:`state_plan`). Everything push looked at and what became of it
is kept in an :class:`Outcome`, which becomes the output and the exit status.

It reads the remote only: the writing is :mod:`ckptstore.cli.push_upload`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from ckptstore import artifact, publisher
from ckptstore import manifest as mf
from ckptstore.cli import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE, common
from ckptstore.cli.push_source import LocalCheckpoint
from ckptstore.manifest import Manifest
from ckptstore.remote import Remote

#: what TensorFlow writes at the top of an export directory (as ckptstore.saved_model knows it)
_TENSORFLOW_ENTRIES = ("saved_model.pb", "saved_model.pbtxt", "variables", "fingerprint.pb")

# Statuses of what was not pushed (``skipped[].status`` in --json).
IDENTICAL = "identical"  # committed at URL with the same content: fine (exit 0)
NOT_SELECTED = "not_selected"  # in DIR, but not asked for (fine)
CONFLICT = "conflict"  # URL holds a different artifact of that name (exit 2)
INVALID = "invalid"  # incomplete, or TensorFlow cannot read it (exit 2)
FAILED = "failed"  # the upload failed (exit 2) or did not verify (exit 1)


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


# --- which of DIR's checkpoints -----------------------------------------------------------


def select(
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


# --- against what URL holds ---------------------------------------------------------------


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


def classify(
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

    def conflict(name: str, url: str, reason: str) -> None:
        conflicting.append(name)
        if outcome is not None:
            outcome.skip(name, url, CONFLICT, reason)

    for name, local in manifests.items():
        url = f"{remote.url.rstrip('/')}/{name}"
        there = stored.get(name)
        if isinstance(there, Manifest):
            diff = _difference(local, there)
            if diff is None:
                identical.append(name)
            else:
                conflict(
                    name,
                    url,
                    f"already committed there with other content ({diff}); {_conflict_fix(url)}",
                )
            continue
        if there is not None:  # a manifest that fails validation: not ours to replace
            conflict(
                name, url, f"holds an invalid manifest of that name ({there}); {_conflict_fix(url)}"
            )
            continue
        data = remote.data_files_of(name, names)
        if data and name not in leftovers:
            conflict(
                name,
                url,
                f"holds files of that name that no manifest vouches for "
                f"({', '.join(data[:3])}): written by plain TensorFlow or someone else, "
                f"not ckptstore. {_conflict_fix(url)}",
            )
            continue
        upload.append(name)
    return upload, identical, conflicting


def classify_saved_model(
    remote: Remote, call: artifact.Call, local_dir: str, files: list[str]
) -> tuple[str, str, str] | None:
    """What URL holds where the SavedModel in ``local_dir`` would be committed.

    ``None``: nothing in the way, push it. Else ``(status, reason, what)``:
    :data:`IDENTICAL` (committed there with the same content), or
    :data:`CONFLICT` (committed with other content, or a SavedModel ckptstore
    did not write, which is the user's and never replaced); ``what`` says it
    in a few words.
    """
    url = remote.url
    names = call("list", remote.list_names)
    existing = publisher.read_committed(remote, mf.SAVED_MODEL_NAME, call)
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
            return (
                IDENTICAL,
                "already committed there with the same content",
                "committed there already, same content",
            )
        return (
            CONFLICT,
            f"a SavedModel is already committed there with other content ({diff}); "
            f"{_conflict_fix(url)}",
            "committed there with other content",
        )
    marked = publisher.pending_name(mf.SAVED_MODEL_NAME) in names
    theirs = [n for n in _TENSORFLOW_ENTRIES if n in names]
    if theirs and not marked:  # a SavedModel ckptstore did not write: the user's, never replaced
        return (
            CONFLICT,
            f"already holds a SavedModel ckptstore did not write ({', '.join(theirs)}, no "
            f"{mf.manifest_name(mf.SAVED_MODEL_NAME)}); push does not overwrite it: push to "
            "another URL, or vouch for what is there with ckptstore.saved_model.adopt(URL)",
            "holds a SavedModel ckptstore did not write",
        )
    return None


# --- URL's state file ---------------------------------------------------------------------


def state_plan(
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
