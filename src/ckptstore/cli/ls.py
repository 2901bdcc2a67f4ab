"""``ckptstore ls URL``: what is stored under a URL, run by run, and what is left over."""

from __future__ import annotations

import argparse
import posixpath
from typing import Any

from ckptstore import inventory as inv
from ckptstore.cli import EXIT_OK, common
from ckptstore.remote import Remote

SUMMARY = "list checkpoints, SavedModels and Keras files, and what is left over"

DESCRIPTION = """\
List what ckptstore stored under URL, without downloading anything: committed
checkpoints (name, number, step, time, size), SavedModel export directories
(Exporter versions are numbered), Keras files, and who writes each run (the
lease: host, pid, and whether that writer is alive, expired, gone or released).

A URL above several runs lists each run (up to --depth levels down). Files no
manifest vouches for are listed too, with a status:

  uploading    the run's writer is alive and may be uploading it (never touched)
  unfinished   an upload ckptstore marked as started less than --min-age ago
  interrupted  ckptstore's leftover of an upload whose writer is gone: gc deletes it
  temporary    ckptstore's temporary name, left by a write that was cut short
  unmanaged    not provably ckptstore's: plain TensorFlow's checkpoints, a user's
               files (ckptstore never deletes them)
  invalid      a manifest that fails validation: that artifact is not committed"""

EPILOG = """\
examples:
  ckptstore ls s3://bucket/runs/run-7
  ckptstore ls s3://bucket/runs                     every run under it
  ckptstore ls --json gs://bucket/run | jq '.runs[].artifacts[] | select(.committed)'
  ckptstore ls ./checkpoints/run-1                  a local directory (file:// works too)

An empty URL lists nothing and exits 0; a bucket that does not exist exits 2."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.command_parser(
        subparsers, "ls", summary=SUMMARY, description=DESCRIPTION, epilog=EPILOG
    )
    common.add_url_argument(parser, "a run's URL, or a directory above several runs")
    add_scan_options(parser)
    return parser


def add_scan_options(parser: argparse.ArgumentParser) -> None:
    """``--depth`` and ``--min-age``: how far to look, and when a marked upload counts as dead."""
    parser.add_argument(
        "--depth",
        type=int,
        default=inv.DEFAULT_DEPTH,
        metavar="N",
        help=f"directory levels below URL to look in (default {inv.DEFAULT_DEPTH})",
    )
    parser.add_argument(
        "--min-age",
        type=common.parse_duration,
        default=inv.DEFAULT_MIN_AGE,
        metavar="AGE",
        help="how old an upload ckptstore marked as started (a SavedModel or Keras file: no "
        "lease says if its writer lives) must be to count as interrupted: 90s, 30m, 2h, 1d "
        "(default 1h)",
    )


def scan(args: argparse.Namespace) -> inv.Inventory:
    """Open ``args.url`` and scan it; a missing bucket raises :class:`common.CommandError`."""
    remote = common.open_remote(args)
    found = inv.scan(
        remote,
        depth=args.depth,
        min_age=args.min_age,
        retry=common.CLI_RETRY,
        redactor=args.redactor,
    )
    if found.objects == 0:
        one = _one_artifact(remote, args)
        if one is not None:
            return one
        common.check_found(remote, args.out)
    return found


def _one_artifact(remote: Remote, args: argparse.Namespace) -> inv.Inventory | None:
    """URL names one artifact (``.../ckpt-7``, ``.../best.keras``, as ls and verify print
    them): its directory, with only that artifact; ``None`` if there is none of that name."""
    root = remote.root.rstrip("/")
    parent, name = posixpath.split(root)
    shown = args.redactor.url.rstrip("/")
    if not parent or not name or "/" not in shown:
        return None
    directory = Remote(remote.backend, parent, shown.rsplit("/", 1)[0])
    found = inv.scan(
        directory, depth=1, min_age=args.min_age, retry=common.CLI_RETRY, redactor=args.redactor
    )
    runs = [
        inv.Run(run.path, run.writer, [a for a in run.artifacts if a.location == name])
        for run in found.runs
        if run.path == ""
    ]
    runs = [run for run in runs if run.artifacts]
    if not runs:
        return None
    return inv.Inventory(found.remote, runs, found.objects)


def run(args: argparse.Namespace) -> int:
    found = scan(args)
    out = args.out
    out.document(
        {
            "url": found.url_of(""),
            "runs": [
                {
                    "url": found.url_of(run.path),
                    "path": run.path,
                    "writer": run.writer.to_json() if run.writer is not None else None,
                    "artifacts": [common.artifact_json(found, a) for a in run.artifacts],
                }
                for run in found.runs
            ],
        }
    )
    committed = uncommitted = 0
    for run in found.runs:
        out.result(found.url_of(run.path))
        if run.writer is not None:
            label = "writer" if run.writer.alive else "last writer"
            out.result(f"  {label}: {run.writer.describe()}")
        rows = [["NAME", "KIND", "NUMBER", "STEP", "TIME (UTC)", "SIZE", "STATUS"]]
        for a in run.artifacts:
            status = a.status
            if not a.committed and (out.verbose or a.status != inv.UNMANAGED):
                status = f"{a.status}: {a.reason}" if a.reason else a.status
            rows.append(
                [
                    a.name,
                    a.kind,
                    "-" if a.number is None else str(a.number),
                    "-" if a.step is None else str(a.step),
                    common.time_text(a.time),
                    common.size_text(a.bytes),
                    status,
                ]
            )
            committed += a.committed
            uncommitted += not a.committed
            if out.verbose and not a.committed:
                for name in a.files:
                    out.detail(f"    {found.url_of(a.path_of(name))}")
        if len(rows) > 1:
            for line in common.table(rows, right=(2, 3, 5)):
                out.result(line)
        out.result()
    if found.runs:
        collectable = sum(a.collectable for a in found.artifacts())
        tail = f" ({collectable} of them ckptstore gc would delete)" if collectable else ""
        out.note(
            f"{common.plural(committed, 'committed artifact')} and {uncommitted} uncommitted"
            f"{tail} in {common.plural(len(found.runs), 'run')} under {found.url_of('')}"
        )
    elif found.objects:
        out.note(f"no ckptstore artifacts under {found.url_of('')} ({found.objects} other objects)")
    return EXIT_OK
