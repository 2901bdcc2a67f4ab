"""``ckptstore verify URL``: are the stored artifacts exactly what their manifests vouch for?"""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore import inventory as inv
from ckptstore.backends.base import READ_BACK, SERVICE_CHECKSUM
from ckptstore.cli import EXIT_INTEGRITY, EXIT_OK, common, ls

SUMMARY = "check stored artifacts against their manifests (exit 1 on a mismatch)"

DESCRIPTION = """\
Check the newest committed artifact of each run (with --all: every committed
one) against its manifest, file by file: size and CRC32C (MD5 on Google Drive).

Nothing is downloaded where the service keeps a checksum the manifest can
predict: S3 and GCS keep a CRC32C of every object ckptstore uploads, Drive an
MD5. Where it keeps none (a local directory, file://), or keeps one the manifest
cannot predict (an S3 multipart object uploaded with a composite checksum, as
ckptstore 0.1.0 did), the file is read back and hashed, and the output says so.
--deep reads every byte back and hashes it, whatever the service keeps.

Uncommitted leftovers are listed on stderr but are not failures: nothing ever
restores them. An invalid manifest is a failure."""

EPILOG = """\
examples:
  ckptstore verify s3://bucket/runs/run-7           the newest checkpoint: OK or FAILED
  ckptstore verify --all s3://bucket/runs           every committed artifact of every run
  ckptstore verify --all --deep gs://bucket/run-7   ... reading every byte back
  ckptstore verify --json s3://bucket/run-7 | jq .ok

exit status: 0 all checked artifacts match (or nothing is committed), 1 a file is
missing or differs from its manifest (each one is named), 2 the URL cannot be read."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.command_parser(
        subparsers, "verify", summary=SUMMARY, description=DESCRIPTION, epilog=EPILOG
    )
    common.add_url_argument(parser, "a run's URL, or a directory above several runs")
    parser.add_argument(
        "--all",
        action="store_true",
        help="check every committed artifact, not only the newest of each run",
    )
    parser.add_argument(
        "--deep",
        action="store_true",
        help="read every byte back and hash it (downloads everything it checks)",
    )
    ls.add_scan_options(parser)
    return parser


def _checked(checks: list[inv.FileCheck]) -> str | None:
    methods = {c.check.method for c in checks if c.check is not None}
    if not methods:
        return None
    return methods.pop() if len(methods) == 1 else "mixed"


def _how(checks: list[inv.FileCheck]) -> str:
    service = sorted(
        {c.check.detail for c in checks if c.check and c.check.method == SERVICE_CHECKSUM}
    )
    back = sorted({c.check.detail for c in checks if c.check and c.check.method == READ_BACK})
    if service and not back:
        return f"{', '.join(service)}, nothing downloaded"
    said = []
    if service:
        said.append(", ".join(service))
    if back:
        said.append("read back" + (f" ({'; '.join(d for d in back if d)})" if any(back) else ""))
    return "; ".join(said)


def run(args: argparse.Namespace) -> int:
    found = ls.scan(args)
    out = args.out
    artifacts = found.artifacts()
    targets = [a for a in artifacts if a.committed] if args.all else inv.newest_committed(found)
    invalid = [a for a in artifacts if a.status == inv.INVALID]
    leftovers = [a for a in artifacts if not a.committed and a.status != inv.INVALID]

    reports = []
    failed = []
    skipped: list[dict[str, str]] = []
    for a in targets:
        checks = inv.verify_artifact(
            found, a, deep=args.deep, retry=common.CLI_RETRY, redactor=args.redactor
        )
        problems = [c.problem for c in checks if c.problem is not None]
        url = found.url_of(a.location)
        changed = inv.changed_since_scan(found, a) if problems else None
        if changed is not None:  # a live writer's retirement or re-save: not damage
            skipped.append({"url": url, "reason": changed})
            out.note(f"skipped {url}: {changed}")
            continue
        entry = common.artifact_json(found, a)
        entry.update(
            ok=not problems,
            problems=problems,
            checked=_checked(checks),
            files=[
                {
                    "name": c.name,
                    "bytes": c.bytes,
                    "ok": c.ok,
                    "checked": c.check.method if c.check is not None else None,
                    "detail": (c.check.detail or None) if c.check is not None else None,
                    "problem": c.problem,
                }
                for c in checks
            ],
        )
        reports.append(entry)
        size = f"{common.plural(len(checks), 'file')}, {common.size_text(a.bytes)}"
        if problems:
            failed.append(url)
            out.result(f"FAILED  {url}  ({size})")
            for problem in problems:
                out.result(f"          {problem}")
        else:
            out.result(f"OK      {url}  ({size}; {_how(checks)})")
        for c in checks:
            if c.check is not None:
                out.detail(f"          {c.name}: {c.check.method} ({c.check.detail})")
    for a in invalid:
        url = found.url_of(a.location)
        failed.append(url)
        entry = common.artifact_json(found, a)
        entry.update(ok=False, problems=[a.reason], checked=None, files=[])
        reports.append(entry)
        out.result(f"FAILED  {url}  (invalid manifest: {a.reason})")

    out.document(
        {
            "url": found.url_of(""),
            "ok": not failed,
            "all": bool(args.all),
            "deep": bool(args.deep),
            "artifacts": reports,
            "skipped": skipped,
            "uncommitted": [common.artifact_json(found, a) for a in leftovers],
        }
    )
    if leftovers:
        out.note(
            f"note: {common.plural(len(leftovers), 'uncommitted item')} under {found.url_of('')} "
            "(not checked, not a failure; ckptstore ls shows them, ckptstore gc collects "
            "ckptstore's leftovers)"
        )
    if failed:
        out.error(
            f"ckptstore verify: {len(failed)} of {common.plural(len(reports), 'artifact')} "
            f"FAILED: {', '.join(failed)}"
        )
        return EXIT_INTEGRITY
    if not reports:
        if found.objects:
            out.note(f"nothing committed under {found.url_of('')}: nothing to verify")
        return EXIT_OK
    out.note(f"{common.plural(len(reports), 'artifact')} verified under {found.url_of('')}")
    return EXIT_OK
