"""What a remote holds, read without writing: runs, artifacts, leftovers, and who writes.

The ``ckptstore`` command's ``ls``, ``verify`` and ``gc`` (:mod:`ckptstore.cli`)
stand on this module. It imports no TensorFlow, and it writes nothing.

:func:`scan` lists a URL a few levels deep (a URL above several runs lists each
run) and sorts every object it finds into *artifacts*:

* **committed**: a manifest vouches for it (a checkpoint ``ckpt-7``, a Keras
  file ``best.keras``, a SavedModel export directory);
* **uploading**: data without a manifest in a run whose writer is alive (per its
  lease): an upload in flight looks exactly like a leftover, so it is left alone;
* **unfinished**: an upload ckptstore marked as started (``<name>.ckptstore-pending.json``)
  less than ``min_age`` ago; such uploads (SavedModels, Keras files) take no
  lease, so only age can tell a dead one from one still going;
* **interrupted**: ckptstore's own leftover of an upload whose writer is gone:
  data of a checkpoint the last writer's lease listed as in flight, or files an
  old enough in-progress marker lists. ``ckptstore gc`` deletes these;
* **temporary**: ckptstore's temporary names (a write-then-rename cut short);
* **unmanaged**: files no manifest vouches for and that ckptstore cannot prove it
  wrote (a checkpoint plain TensorFlow wrote, a user's file). Never deleted;
* **invalid**: a manifest that fails validation: the artifact is not committed.

These are exactly the rules the writer itself follows
(:meth:`ckptstore.uploader.Uploader._collect_orphans`,
:func:`ckptstore.publisher.clean_interrupted`), so nothing that a live writer may
still commit, and nothing ckptstore did not write, is ever called collectable.

Example::

    remote = Remote(*backends.resolve("s3://bucket/runs"), "s3://bucket/runs")  # doctest: +SKIP
    for run in scan(remote).runs:                                                # doctest: +SKIP
        print(run.path, [a.name for a in run.artifacts if a.committed])
"""

from __future__ import annotations

import contextvars
import dataclasses
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ckptstore import artifact as steps
from ckptstore import manifest as mf
from ckptstore import publisher
from ckptstore.backends.base import Check, mtime_of
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.errors import ManifestError
from ckptstore.manifest import FileEntry, Manifest
from ckptstore.ownership import LEASE_NAME, Holder, Liveness, judge
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy

T = TypeVar("T")

COMMITTED = "committed"
UPLOADING = "uploading"
UNFINISHED = "unfinished"
INTERRUPTED = "interrupted"
TEMPORARY = "temporary"
UNMANAGED = "unmanaged"
INVALID = "invalid"
STATUSES = (COMMITTED, UPLOADING, UNFINISHED, INTERRUPTED, TEMPORARY, UNMANAGED, INVALID)

#: how many directory levels below the URL are listed: URL/run/ckpt-1.index is 2,
#: URL/run/serving/3/saved_model.manifest.json is 4
DEFAULT_DEPTH = 4
#: an in-progress marker (no lease behind it) younger than this may belong to a live upload
DEFAULT_MIN_AGE = 3600.0
#: a Keras file ckptstore could have written, reported when no manifest vouches for it
_KERAS_SUFFIXES = (".keras", ".weights.h5")
_SAVED_MODEL_PB = ("saved_model.pb", "saved_model.pbtxt")
_KIND_ORDER = {mf.CHECKPOINT: 0, mf.SAVED_MODEL: 1, mf.KERAS: 2, "file": 3}


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One object found under the scanned URL."""

    path: str  # relative POSIX path under the scanned root
    size: int | None
    mtime: float | None  # seconds since the epoch, where the service reports it


@dataclasses.dataclass(frozen=True)
class Writer:
    """A run's lease, as this process judges it (:func:`ckptstore.ownership.judge`)."""

    holder: Holder | None  # None: the lease object is not a lease ckptstore can read
    state: str  # "alive", "expired", "gone" (this machine, process ended), "released", ...

    @property
    def alive(self) -> bool:
        return self.state == "alive"

    def describe(self) -> str:
        if self.holder is None:
            return f"an unreadable {LEASE_NAME} (treated as no writer)"
        return f"{self.holder.describe()}: {self.state}"

    def to_json(self) -> dict[str, Any]:
        h = self.holder
        if h is None:
            return {"state": self.state}
        return {
            "host": h.host,
            "pid": h.pid,
            "state": self.state,
            "since": h.since,
            "last_seen": h.last_seen,
            "lease_seconds": h.lease_seconds,
            "in_flight": list(h.in_flight),
        }


@dataclasses.dataclass
class Artifact:
    """A committed artifact, or a set of stored files that would be one."""

    run: str  # relative path of the run (group) it is listed under; "" is the URL itself
    directory: str  # relative path of the directory its files' names are relative to
    name: str
    kind: str  # checkpoint, saved_model, keras; "file" for a temporary name
    status: str  # one of STATUSES
    files: list[str]  # names under ``directory``: the manifest's, or what is stored
    bytes: int
    time: float | None
    number: int | None = None
    step: int | None = None
    manifest: Manifest | None = None
    #: whether ``ckptstore gc --yes`` deletes it (it may still take the run's lease first)
    collectable: bool = False
    #: for people: why it has this status
    reason: str = ""

    @property
    def committed(self) -> bool:
        return self.status == COMMITTED

    def path_of(self, name: str) -> str:
        """A file's path relative to the scanned root."""
        return join(self.directory, name)

    @property
    def location(self) -> str:
        """The artifact's own path relative to the scanned root (a prefix, file or directory)."""
        if self.kind == mf.SAVED_MODEL:
            return self.directory
        return self.path_of(self.name)


@dataclasses.dataclass
class Run:
    """One directory of artifacts: a checkpoint run, an Exporter base, a folder of Keras files."""

    path: str  # relative to the scanned root; "" is the URL itself
    writer: Writer | None = None
    artifacts: list[Artifact] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Inventory:
    remote: Remote
    runs: list[Run]
    #: how many objects the listing found
    objects: int

    def url_of(self, relative: str) -> str:
        """The credential-free URL of a path relative to the scanned root."""
        base = self.remote.url.rstrip("/")
        return f"{base}/{relative}" if relative else base

    def artifacts(self) -> list[Artifact]:
        return [a for run in self.runs for a in run.artifacts]


# --- listing ---------------------------------------------------------------------------


def list_objects(remote: Remote, depth: int = DEFAULT_DEPTH) -> dict[str, StoredObject]:
    """Every object under ``remote``'s root, ``depth`` levels deep, by relative path."""
    fs = remote.fs
    fs.invalidate_cache(remote.root)
    try:
        found = fs.find(remote.root, maxdepth=depth, detail=True)
    except FileNotFoundError:
        return {}
    root = fs._strip_protocol(remote.root).rstrip("/") + "/"
    objects = {}
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        path = fs._strip_protocol(str(path))
        if not path.startswith(root) or path.endswith("/"):
            continue
        rel = path[len(root) :]
        size = info.get("size")
        objects[rel] = StoredObject(
            rel, int(size) if isinstance(size, (int, float)) else None, mtime_of(info)
        )
    return objects


# --- sorting what was listed into artifacts ---------------------------------------------


def join(directory: str, name: str) -> str:
    """``name`` under ``directory``, both relative to the scanned root ("" is the root)."""
    return posixpath.join(directory, name) if directory else name


def _dir_of(path: str) -> str:
    return posixpath.dirname(path)


def _under(path: str, directory: str) -> bool:
    return not directory or path == directory or path.startswith(directory + "/")


def _number_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _newest(objects: list[StoredObject]) -> float | None:
    times = [o.mtime for o in objects if o.mtime is not None]
    return max(times) if times else None


def scan(
    remote: Remote,
    *,
    depth: int = DEFAULT_DEPTH,
    min_age: float = DEFAULT_MIN_AGE,
    retry: RetryPolicy | None = None,
    redactor: Redactor | None = None,
    now: float | None = None,
) -> Inventory:
    """List ``remote`` and sort what it holds into runs of artifacts. Writes nothing.

    Raises whatever the client raises when the remote cannot be listed or read
    (after ``retry``); the caller says what that means.
    """
    call = steps.caller(remote, redactor or Redactor(), retry or RetryPolicy(attempts=3))
    now = time.time() if now is None else now
    objects = call("list", lambda: list_objects(remote, depth))
    by_dir: dict[str, dict[str, StoredObject]] = {}
    for rel, obj in objects.items():
        by_dir.setdefault(_dir_of(rel), {})[posixpath.basename(rel)] = obj

    # SavedModel export directories: everything under them is theirs.
    exports = sorted(
        d
        for d, names in by_dir.items()
        if mf.manifest_name(mf.SAVED_MODEL_NAME) in names
        or publisher.pending_name(mf.SAVED_MODEL_NAME) in names
        or any(pb in names for pb in _SAVED_MODEL_PB)
    )
    exports = [d for d in exports if not any(e != d and _under(d, e) for e in exports)]
    plain = [d for d in sorted(by_dir) if not any(_under(d, e) for e in exports)]

    jobs: list[Callable[[], tuple[list[Artifact], tuple[str, Writer] | None]]] = []
    for d in plain:
        jobs.append(lambda d=d: _scan_dir(remote, d, by_dir[d], call, now, min_age))
    for e in exports:
        under = [o for rel, o in objects.items() if _under(rel, e)]
        jobs.append(
            lambda e=e, under=under: (_scan_export(remote, e, under, call, now, min_age), None)
        )
    results = _run_all(jobs)

    runs: dict[str, Run] = {}
    for artifacts, writer in results:
        if writer is not None:
            runs.setdefault(writer[0], Run(writer[0])).writer = writer[1]
        for artifact in artifacts:
            runs.setdefault(artifact.run, Run(artifact.run)).artifacts.append(artifact)
    for run in runs.values():
        run.artifacts.sort(key=_order)
        if run.writer is not None and run.writer.alive:
            # Never while a live writer holds the run, whatever else the rules say.
            for artifact in run.artifacts:
                if artifact.collectable:
                    artifact.collectable = False
                    artifact.reason += "; the run's writer is alive, so gc leaves it"
    return Inventory(remote, [runs[p] for p in sorted(runs)], len(objects))


def _order(a: Artifact) -> tuple:
    return (
        not a.committed,
        _KIND_ORDER.get(a.kind, 9),
        a.number if a.number is not None else -1,
        a.time or 0.0,
        a.name,
    )


def _run_all(jobs: list[Callable[[], T]]) -> list[T]:
    if len(jobs) <= 1:
        return [job() for job in jobs]
    contexts = [contextvars.copy_context() for _ in jobs]
    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        return list(pool.map(lambda c, job: c.run(job), contexts, jobs))


def sub_remote(remote: Remote, directory: str) -> Remote:
    """The remote of ``directory`` (relative to ``remote``'s root), on the same filesystem."""
    if not directory:
        return remote
    return Remote(remote.backend, remote.path(directory), f"{remote.url.rstrip('/')}/{directory}")


def _read_writer(remote: Remote, call: Callable, now: float) -> Writer | None:
    got = call(f"read {LEASE_NAME}", lambda: remote.backend.read_versioned(remote.path(LEASE_NAME)))
    if got is None:
        return None
    holder = Holder.from_json(got[0])
    if holder is None:
        return Writer(None, "unreadable")
    state = judge(holder, now)
    if state == Liveness.FREE:
        return Writer(holder, "released")
    return Writer(holder, state)


def _scan_dir(
    remote: Remote,
    d: str,
    names: dict[str, StoredObject],
    call: Callable,
    now: float,
    min_age: float,
) -> tuple[list[Artifact], tuple[str, Writer] | None]:
    """Checkpoints, Keras files and leftovers directly in directory ``d``."""
    sub = sub_remote(remote, d)
    artifacts: list[Artifact] = []
    writer = _read_writer(sub, call, now) if LEASE_NAME in names else None

    with_manifest = [c for c in (mf.checkpoint_of_manifest(n) for n in names) if c is not None]
    manifests = _read_manifests(sub, with_manifest, call)
    committed: dict[str, Manifest] = {}
    for name, found in sorted(manifests.items()):
        if found is None:  # retired since the listing (a live writer's max_to_keep)
            continue
        if isinstance(found, ManifestError):
            obj = names[mf.manifest_name(name)]
            artifacts.append(
                Artifact(
                    d,
                    d,
                    name,
                    _guess_kind(name),
                    INVALID,
                    [mf.manifest_name(name)],
                    obj.size or 0,
                    obj.mtime,
                    _number_of(name),
                    reason=str(found),
                )
            )
            continue
        committed[name] = found
        artifacts.append(_committed(d, d, found))

    temps = sorted(n for n in names if TEMP_MARKER in n and not n.startswith(LEASE_NAME))
    pending = sorted(n for n in names if n.endswith(publisher.PENDING_SUFFIX) and n not in temps)
    names = dict(names)  # ages decide what is collectable: ask where the listing did not say
    for n in temps + pending:
        names[n] = _timed(sub, n, names[n], call)
    claimed: set[str] = set(temps)

    # Uploads ckptstore marked as started (Keras files): the marker lists their files.
    for marker in pending:
        name = marker[: -len(publisher.PENDING_SUFFIX)]
        listed = call("read an in-progress marker", lambda n=name: publisher.read_pending(sub, n))
        vouched = {e.name for e in committed[name].files} if name in committed else set()
        files = [f for f in (listed or []) if f in names and f not in vouched] + [marker]
        claimed.update(files)
        artifacts.append(_marked(d, d, name, _guess_kind(name), files, names, now, min_age, marker))

    # Checkpoint data no manifest vouches for: in flight, a dead writer's, or not ckptstore's.
    data: dict[str, list[str]] = {}
    for n in names:
        c = mf.checkpoint_of_data_file(n)
        if c is not None and c not in with_manifest and n not in claimed:
            data.setdefault(c, []).append(n)
    for c, files in sorted(data.items()):
        claimed.update(files)
        status, collectable, reason = _checkpoint_leftover(c, writer, bool(committed))
        objs = [names[f] for f in files]
        artifacts.append(
            Artifact(
                d,
                d,
                c,
                mf.CHECKPOINT,
                status,
                sorted(files),
                sum(o.size or 0 for o in objs),
                _newest(objs),
                _number_of(c),
                collectable=collectable,
                reason=reason,
            )
        )

    # Keras files nothing vouches for.
    for n in sorted(names):
        if n in claimed or n in committed or not n.endswith(_KERAS_SUFFIXES):
            continue
        if any(n in {e.name for e in m.files} for m in committed.values()):
            continue
        obj = names[n]
        artifacts.append(
            Artifact(
                d,
                d,
                n,
                mf.KERAS,
                UNMANAGED,
                [n],
                obj.size or 0,
                obj.mtime,
                reason="no manifest: not written by ckptstore (or not committed)",
            )
        )

    for n in temps:
        obj = names[n]
        if writer is not None and writer.holder is not None:
            collectable = not writer.alive
            reason = (
                "a temporary name of the run's live writer"
                if writer.alive
                else "left by a write-then-rename that was cut short"
            )
        else:
            old = min_age <= 0 or (obj.mtime is not None and now - obj.mtime >= min_age)
            collectable = old
            reason = (
                "left by a write-then-rename that was cut short"
                if old
                else (f"a temporary name less than {min_age:.0f} s old: a write may be in progress")
            )
        artifacts.append(
            Artifact(
                d,
                d,
                n,
                "file",
                TEMPORARY,
                [n],
                obj.size or 0,
                obj.mtime,
                collectable=collectable,
                reason=reason,
            )
        )

    return artifacts, ((d, writer) if writer is not None else None)


def _read_manifests(
    remote: Remote, names: list[str], call: Callable
) -> dict[str, Manifest | ManifestError | None]:
    """Each manifest, its validation error, or ``None`` when it is gone since the listing."""

    def read(name: str) -> Manifest | ManifestError | None:
        try:
            return call(f"read the manifest of {name}", lambda: remote.read_manifest(name))
        except FileNotFoundError:
            return None
        except ManifestError as exc:
            return exc

    return dict(zip(names, _run_all([lambda n=n: read(n) for n in names])))


def _timed(remote: Remote, name: str, obj: StoredObject, call: Callable) -> StoredObject:
    """``obj`` with its modification time, asked for where the listing had none (Drive)."""
    if obj.mtime is not None:
        return obj
    try:
        when = call(f"read the time of {name}", lambda: remote.backend.modified(remote.path(name)))
    except FileNotFoundError:
        return obj
    return dataclasses.replace(obj, mtime=when)


def _guess_kind(name: str) -> str:
    if name == mf.SAVED_MODEL_NAME:
        return mf.SAVED_MODEL
    if name.endswith(_KERAS_SUFFIXES) or name.endswith(".h5"):
        return mf.KERAS
    return mf.CHECKPOINT


def _committed(run: str, directory: str, manifest: Manifest, name: str | None = None) -> Artifact:
    number = manifest.number
    if number is None and name is not None and name.isdigit():
        number = int(name)
    return Artifact(
        run,
        directory,
        name or manifest.name,
        manifest.kind,
        COMMITTED,
        [e.name for e in manifest.files],
        manifest.total_bytes,
        manifest.timestamp,
        number,
        manifest.step,
        manifest,
    )


def _checkpoint_leftover(
    checkpoint: str, writer: Writer | None, any_committed: bool
) -> tuple[str, bool, str]:
    """``(status, collectable, reason)`` of checkpoint data without a manifest."""
    if writer is None or writer.holder is None:
        if any_committed:
            return UNMANAGED, False, "no manifest, and no writer's lease lists it: not ckptstore's"
        return (
            UNMANAGED,
            False,
            "no manifest: written by plain TensorFlow or by hand (a ckptstore manager on this "
            "URL adopts complete checkpoints)",
        )
    if writer.alive:
        return UPLOADING, False, "the run's writer is alive and may be uploading it"
    if checkpoint in writer.holder.in_flight:
        return (
            INTERRUPTED,
            True,
            f"the last writer ({writer.state}) was uploading or retiring it and never finished",
        )
    return UNMANAGED, False, "no manifest, and the last writer's lease does not list it"


def _marked(
    run: str,
    directory: str,
    name: str,
    kind: str,
    files: list[str],
    stored: dict[str, StoredObject],
    now: float,
    min_age: float,
    marker: str,
) -> Artifact:
    """What an in-progress marker (``marker``, ``<name>.ckptstore-pending.json``) says is left."""
    started = stored[marker].mtime if marker in stored else None
    objs = [stored[f] for f in files if f in stored]
    old = min_age <= 0 or (started is not None and now - started >= min_age)
    if old:
        when = f"{_ago(now - started)} ago" if started is not None else "at an unknown time"
        status, reason = INTERRUPTED, f"an upload ckptstore started {when} and never committed"
    else:
        when = f"{_ago(now - started)} ago" if started is not None else "at an unknown time"
        status, reason = (
            UNFINISHED,
            f"an upload started {when}: it may still be going (no lease says); gc deletes it "
            f"once it is older than --min-age ({min_age:.0f} s)",
        )
    return Artifact(
        run,
        directory,
        name,
        kind,
        status,
        files,
        sum(o.size or 0 for o in objs),
        _newest(objs),
        collectable=old,
        reason=reason,
    )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _scan_export(
    remote: Remote,
    e: str,
    under: list[StoredObject],
    call: Callable,
    now: float,
    min_age: float,
) -> list[Artifact]:
    """One SavedModel export directory ``e`` (relative), with everything listed under it."""
    sub = sub_remote(remote, e)
    run = _dir_of(e) if e else ""
    name = posixpath.basename(e) if e else posixpath.basename(remote.root.rstrip("/"))
    stored = {o.path[len(e) + 1 :] if e else o.path: o for o in under}
    artifacts: list[Artifact] = []
    committed: Manifest | None = None
    manifest_file = mf.manifest_name(mf.SAVED_MODEL_NAME)
    if manifest_file in stored:
        try:
            committed = call("read the manifest", lambda: sub.read_manifest(mf.SAVED_MODEL_NAME))
        except FileNotFoundError:
            committed = None
        except ManifestError as exc:
            obj = stored[manifest_file]
            artifacts.append(
                Artifact(
                    run,
                    e,
                    name,
                    mf.SAVED_MODEL,
                    INVALID,
                    [manifest_file],
                    obj.size or 0,
                    obj.mtime,
                    _number_of_version(name),
                    reason=str(exc),
                )
            )
        if committed is not None:
            artifacts.append(_committed(run, e, committed, name))
    marker = publisher.pending_name(mf.SAVED_MODEL_NAME)
    if marker in stored:
        stored[marker] = _timed(sub, marker, stored[marker], call)
        listed = call(
            "read an in-progress marker", lambda: publisher.read_pending(sub, mf.SAVED_MODEL_NAME)
        )
        vouched = {x.name for x in committed.files} if committed is not None else set()
        files = [f for f in (listed or []) if f in stored and f not in vouched] + [marker]
        artifact = _marked(run, e, name, mf.SAVED_MODEL, files, stored, now, min_age, marker)
        artifact.number = _number_of_version(name)
        artifacts.append(artifact)
    elif not artifacts:
        objs = list(stored.values())
        artifacts.append(
            Artifact(
                run,
                e,
                name,
                mf.SAVED_MODEL,
                UNMANAGED,
                sorted(stored),
                sum(o.size or 0 for o in objs),
                _newest(objs),
                _number_of_version(name),
                reason="a SavedModel ckptstore did not commit (ckptstore.saved_model.adopt "
                "vouches for it)",
            )
        )
    return artifacts


def _number_of_version(name: str) -> int | None:
    return int(name) if name.isdigit() else None


# --- verifying ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """One file of an artifact compared with its manifest entry."""

    name: str
    bytes: int
    check: Check | None  # None: the object is missing
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def newest_committed(inventory: Inventory) -> list[Artifact]:
    """The newest committed artifact of each kind in each run (number, then time)."""
    newest: dict[tuple[str, str], Artifact] = {}
    for artifact in inventory.artifacts():
        if not artifact.committed:
            continue
        key = (artifact.run, artifact.kind)
        best = newest.get(key)
        if best is None or _age_key(artifact) > _age_key(best):
            newest[key] = artifact
    return sorted(newest.values(), key=lambda a: (a.run, _KIND_ORDER.get(a.kind, 9)))


def _age_key(a: Artifact) -> tuple:
    if a.kind in (mf.CHECKPOINT, mf.SAVED_MODEL):  # checkpoint numbers, Exporter versions
        return (a.number if a.number is not None else -1, a.time or 0.0)
    return (a.time or 0.0, a.number if a.number is not None else -1)


def verify_artifact(
    inventory: Inventory,
    artifact: Artifact,
    *,
    deep: bool = False,
    retry: RetryPolicy | None = None,
    redactor: Redactor | None = None,
    concurrency: int = 8,
) -> list[FileCheck]:
    """Compare every file of a committed artifact with its manifest, without downloading it.

    The service's checksum where it keeps one the manifest can predict, else a
    read-back; ``deep`` reads every byte back as well.
    """
    assert artifact.manifest is not None
    remote = inventory.remote
    call = steps.caller(remote, redactor or Redactor(), retry or RetryPolicy(attempts=3))
    remote.fs.invalidate_cache(remote.root)

    def check(entry: FileEntry) -> FileCheck:
        path = remote.path(artifact.path_of(entry.name))
        try:
            found = call(
                f"check {entry.name}", lambda: remote.backend.check(path, entry, deep=deep)
            )
        except FileNotFoundError:
            return FileCheck(entry.name, entry.size, None, f"{entry.name}: missing")
        return FileCheck(entry.name, entry.size, found, found.problem)

    entries = list(artifact.manifest.files)
    if len(entries) <= 1 or concurrency <= 1:
        return [check(e) for e in entries]
    contexts = [contextvars.copy_context() for _ in entries]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(entries))) as pool:
        return list(pool.map(lambda c, e: c.run(check, e), contexts, entries))


def changed_since_scan(inventory: Inventory, artifact: Artifact) -> str | None:
    """Why ``artifact`` is no longer what was scanned (retired, or saved again), else ``None``.

    A live writer retires old checkpoints and may save a number again while a
    verification runs: a file missing then is not damage.
    """
    assert artifact.manifest is not None
    name = mf.SAVED_MODEL_NAME if artifact.kind == mf.SAVED_MODEL else artifact.manifest.name
    sub = sub_remote(inventory.remote, artifact.directory)
    sub.fs.invalidate_cache(sub.root)
    try:
        now = sub.read_manifest(name)
    except FileNotFoundError:
        return "retired while it was being checked (its manifest is gone)"
    except ManifestError:
        return None  # damaged since: report what was found
    if now != artifact.manifest:
        return "saved again while it was being checked (a new manifest)"
    return None


__all__ = [
    "COMMITTED",
    "INTERRUPTED",
    "INVALID",
    "TEMPORARY",
    "UNFINISHED",
    "UNMANAGED",
    "UPLOADING",
    "Artifact",
    "FileCheck",
    "Inventory",
    "Run",
    "StoredObject",
    "Writer",
    "changed_since_scan",
    "join",
    "list_objects",
    "newest_committed",
    "scan",
    "sub_remote",
    "verify_artifact",
]
