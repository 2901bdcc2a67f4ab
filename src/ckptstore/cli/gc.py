"""``ckptstore gc URL [--yes]``: delete what interrupted uploads left, following ownership."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ckptstore import __version__, artifact, publisher
from ckptstore import inventory as inv
from ckptstore import manifest as mf
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.cli import EXIT_OK, EXIT_USAGE, common, ls
from ckptstore.errors import OwnershipError
from ckptstore.ownership import LEASE_NAME, Lease, judge

SUMMARY = "delete what interrupted uploads left behind (a dry run unless --yes)"

DESCRIPTION = """\
List what interrupted ckptstore uploads left under URL, and with --yes delete it.
Without --yes nothing is deleted (a dry run).

gc deletes only what is provably ckptstore's own leftover, by the rules a writer
itself follows:
  * in a checkpoint run: the data of checkpoints the run's last writer listed in
    its lease as in flight, that no manifest vouches for, and ckptstore's
    temporary names, once that writer is gone (released, its lease expired, or
    its process ended on this machine). gc takes the run's lease while it
    deletes and releases it after, as a writer would;
  * for a SavedModel or a Keras file: the files ckptstore's in-progress marker
    (<name>.ckptstore-pending.json) lists, minus any the committed manifest
    vouches for, once the marker is older than --min-age (such uploads hold no
    lease, so age is the only sign that their writer is gone).

It never deletes a committed artifact, a file no ckptstore marker or lease
names (checkpoints plain TensorFlow wrote, your own files), or anything in a
run whose writer is alive: an upload in flight looks exactly like a leftover.
Such a run is reported with its writer (host, pid) and left alone; that is not
an error (exit 0): its writer collects its own leftovers, and gc can once the
writer is gone."""

EPILOG = """\
examples:
  ckptstore gc s3://bucket/runs/run-7              what would be deleted (nothing is)
  ckptstore gc --yes s3://bucket/runs/run-7        delete it
  ckptstore gc --yes --min-age 10m gs://bucket/exports   markers older than 10 minutes
  ckptstore gc --json s3://bucket/runs | jq '.candidates[].url'

exit status: 0 done (including "nothing to delete" and runs left to a live writer),
2 the URL cannot be read, or a deletion failed."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.command_parser(
        subparsers, "gc", summary=SUMMARY, description=DESCRIPTION, epilog=EPILOG
    )
    common.add_url_argument(parser, "a run's URL, or a directory above several runs")
    parser.add_argument(
        "--yes", action="store_true", help="delete what is listed (without it: a dry run)"
    )
    ls.add_scan_options(parser)
    return parser


def _under_lease(run: inv.Run, a: inv.Artifact) -> bool:
    """Whether the run's lease governs ``a`` (checkpoint leftovers and temporary names)."""
    return (
        run.writer is not None
        and run.writer.holder is not None
        and a.directory == run.path
        and not any(f.endswith(publisher.PENDING_SUFFIX) for f in a.files)
    )


def _collect_run(
    found: inv.Inventory, run: inv.Run, args: argparse.Namespace
) -> tuple[list[str], str | None]:
    """Take the run's lease, delete the last writer's leftovers, release it.

    The same rule as the writer's own sweep (``Uploader._collect_orphans``),
    recomputed once the lease is held. Returns ``(deleted paths, why skipped)``.
    """
    sub = inv.sub_remote(found.remote, run.path)
    call = artifact.caller(sub, args.redactor, common.CLI_RETRY)
    lease = Lease(sub, redactor=args.redactor, library_version=f"{__version__} (ckptstore gc)")
    logger = logging.getLogger("ckptstore")
    level = logger.level
    if not args.verbose:  # the library's "took over ... from ..." warning; said below instead
        logger.setLevel(logging.ERROR)
    try:
        previous = call("take the writer lease", lease.acquire)
    except OwnershipError as exc:
        holder = exc.holder
        who = holder.describe() if holder is not None else "another process"
        return [], f"written by {who}: it came alive, gc left the run to it"
    finally:
        logger.setLevel(level)
    if previous is not None:
        args.out.note(
            f"{found.url_of(run.path)}: took over the lease of its last writer (host "
            f"{previous.host}, pid {previous.pid}: {judge(previous)}) to delete what it left; "
            "released it after"
        )
    deleted: list[str] = []
    try:
        names = call("list", sub.list_names)
        with_manifest = set(sub.committed_names(names))
        last = lease.previous  # also a released lease: it may list what it never finished
        leftovers = set(last.in_flight) if last is not None else set()
        temps = [n for n in names if TEMP_MARKER in n and not n.startswith(LEASE_NAME)]
        orphans: dict[str, list[str]] = {}
        for n in names:
            c = mf.checkpoint_of_data_file(n)
            if c is not None and c in leftovers and c not in with_manifest and n not in temps:
                orphans.setdefault(c, []).append(n)
        for checkpoint, files in sorted(orphans.items()):
            # Recorded first: a gc killed mid-way leaves them listed for the next writer.
            call("renew the writer lease", lambda c=checkpoint: lease.mark_in_flight(c))
            call(f"delete {checkpoint}", lambda f=files: sub.delete_data(f))
            lease.mark_done(checkpoint)
            deleted += [inv.join(run.path, f) for f in files]
        if temps:
            call("renew the writer lease", lease.renew)
            call("delete temporary names", lambda: sub.delete_data(temps))
            deleted += [inv.join(run.path, t) for t in temps]
    finally:
        lease.release()
    return deleted, None


def _collect_marked(found: inv.Inventory, a: inv.Artifact, args: argparse.Namespace) -> list[str]:
    """An interrupted SavedModel or Keras upload: exactly what its marker lists, via the
    publisher's own :func:`~ckptstore.publisher.clean_interrupted`."""
    sub = inv.sub_remote(found.remote, a.directory)
    call = artifact.caller(sub, args.redactor, common.CLI_RETRY)
    name = mf.SAVED_MODEL_NAME if a.kind == mf.SAVED_MODEL else a.name
    listed = call("read the in-progress marker", lambda: publisher.read_pending(sub, name))
    if listed is None:
        return []  # cleaned meanwhile (a new save of the same artifact)
    keep = publisher.read_committed(sub, name, call)
    vouched = {e.name for e in keep.files} if keep is not None else set()
    doomed = [f for f in listed if f not in vouched] + [publisher.pending_name(name)]
    publisher.clean_interrupted(sub, name, call, keep=keep)
    if a.kind == mf.SAVED_MODEL and keep is None:
        sub.backend.remove_empty_dir(sub.root)  # an empty version looks broken to TF Serving
    return [inv.join(a.directory, f) for f in doomed if f in a.files]  # what was stored


def run(args: argparse.Namespace) -> int:
    found = ls.scan(args)
    out = args.out
    artifacts = found.artifacts()
    candidates = [a for a in artifacts if a.collectable]
    kept = [a for a in artifacts if not a.committed and not a.collectable]
    live = [r for r in found.runs if r.writer is not None and r.writer.alive]
    skipped = [
        {
            "run": found.url_of(r.path),
            "writer": r.writer.to_json(),
            "reason": "its writer is alive: an upload in flight looks exactly like a leftover",
        }
        for r in live
        if r.writer is not None
    ]
    for r in live:
        out.note(
            f"{found.url_of(r.path)}: written by {r.writer.describe()}. gc leaves this run "
            "alone: its writer collects its own leftovers (run gc again once it is gone)"
        )

    deleted: list[str] = []
    errors: list[str] = []
    if args.yes:
        runs = {r.path: r for r in found.runs}
        by_run = sorted({a.run for a in candidates if _under_lease(runs[a.run], a)})
        for path in by_run:
            try:
                got, why = _collect_run(found, runs[path], args)
            except Exception as exc:
                errors.append(f"{found.url_of(path)}: {args.redactor.describe(exc)}")
                continue
            deleted += got
            if why is not None:
                skipped.append({"run": found.url_of(path), "writer": None, "reason": why})
                out.note(f"{found.url_of(path)}: {why}")
        for a in candidates:
            if _under_lease(runs[a.run], a):
                continue
            try:
                if a.status == inv.TEMPORARY:
                    sub = inv.sub_remote(found.remote, a.directory)
                    sub.delete_data([a.name])
                    deleted.append(a.path_of(a.name))
                else:
                    deleted += _collect_marked(found, a, args)
            except Exception as exc:
                errors.append(f"{found.url_of(a.location)}: {args.redactor.describe(exc)}")

    out.document(
        {
            "url": found.url_of(""),
            "dry_run": not args.yes,
            "min_age": args.min_age,
            "ok": not errors,
            "candidates": [
                {
                    **common.artifact_json(found, a),
                    "file_urls": [found.url_of(a.path_of(f)) for f in a.files],
                }
                for a in candidates
            ],
            "deleted": [found.url_of(p) for p in deleted],
            "kept": [common.artifact_json(found, a) for a in kept],
            "skipped": skipped,
            "errors": errors,
        }
    )
    verb = "deleted" if args.yes else "would delete"
    for a in candidates:
        files = f"{common.plural(len(a.files), 'file')}, {common.size_text(a.bytes)}"
        out.result(f"{verb}  {found.url_of(a.location)}  ({a.kind}, {files}): {a.reason}")
        for f in a.files:
            out.detail(f"    {found.url_of(a.path_of(f))}")
    for a in kept:
        if a.status != inv.UNMANAGED or out.verbose:
            out.result(f"kept  {found.url_of(a.location)}  ({a.status}: {a.reason})")
    for error in errors:
        out.error(f"ckptstore gc: could not delete {error}")
    total = sum(a.bytes for a in candidates)
    if not candidates:
        out.note(f"nothing to delete under {found.url_of('')}")
    elif args.yes:
        out.note(
            f"deleted {common.plural(len(deleted), 'file')} "
            f"({common.size_text(total)}) under {found.url_of('')}"
        )
    else:
        out.note(
            f"dry run: {common.plural(len(candidates), 'leftover')} "
            f"({common.size_text(total)}) would be deleted; nothing was. Run again with --yes "
            "to delete them."
        )
    return EXIT_USAGE if errors else EXIT_OK
