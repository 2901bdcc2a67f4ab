"""What every ``ckptstore`` subcommand shares: options, output, URLs, errors, formatting.

Nothing here imports TensorFlow, and nothing here may: ``ls``, ``verify`` and
``gc`` answer without it.

Output contract: a subcommand's result goes to stdout, as a table for people or,
with ``--json``, as exactly one JSON document; everything else (notes, warnings,
errors, progress) goes to stderr. Every line and every document passes through
the URL's :class:`~ckptstore.redaction.Redactor`, so credentials given in the
URL or with ``-o`` are never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

from ckptstore import __version__, backends, progress
from ckptstore.cli import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from ckptstore.errors import CkptStoreError, VerificationError
from ckptstore.inventory import Artifact, Inventory
from ckptstore.progress import size_text
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy

#: global options that take a value as the next word (so it is not taken for the subcommand)
OPTIONS_WITH_VALUES = frozenset({"-o", "--storage-option"})

#: remote operations from the command line: a few quick retries, then report (exit 2)
CLI_RETRY = RetryPolicy(attempts=3, initial_delay=0.5, max_delay=4.0)

DESCRIPTION = """\
See, check, fetch and tidy what ckptstore stored: checkpoints of a ckptstore.CheckpointManager,
SavedModels (ckptstore.saved_model) and Keras files (ckptstore.keras), on any URL
ckptstore writes to (s3://, gs://, gdrive://, file://, a local path).

A URL may be one run or a directory above several runs: ls, verify and gc look a few
levels down and report each run on its own. pull fetches one run's checkpoint, verified,
into a directory plain TensorFlow reads; push moves a directory TensorFlow wrote in.
Only what a manifest vouches for is committed; anything else is reported as uploading,
unfinished, interrupted, temporary or unmanaged (see "ckptstore ls --help")."""

EPILOG = """\
examples:
  ckptstore ls s3://bucket/runs                  what is stored, run by run
  ckptstore verify s3://bucket/runs/run-7        is the newest checkpoint intact?
  ckptstore verify --all --deep gs://bucket/run  every artifact, every byte read back
  ckptstore gc s3://bucket/runs/run-7            what an interrupted upload left (dry run)
  ckptstore gc --yes s3://bucket/runs/run-7      ... and delete it
  ckptstore pull s3://bucket/runs/run-7 ./run-7  the newest checkpoint, verified, for plain TF
  ckptstore push ./old-run s3://bucket/runs/old  a TensorFlow checkpoint directory, committed

credentials:
  The same as the library's: each client's own chain (AWS_* variables, ~/.aws and
  instance roles for s3://; GOOGLE_APPLICATION_CREDENTIALS, gcloud and the metadata
  server for gs://), or -o KEY=VALUE options, which go to the fsspec filesystem as
  ckptstore's storage_options do. VALUE is read as JSON when it parses as JSON
  (true, 3, {"endpoint_url": "..."}), else as a string; a dotted KEY sets a nested
  option:
    ckptstore ls s3://bucket/run -o client_kwargs.endpoint_url=http://127.0.0.1:9000
    ckptstore ls gs://bucket/run -o token=/path/to/service-account.json
  Credentials are never printed, with or without --json.

exit status:
  0  success (also: nothing stored there)
  1  an integrity problem: a stored file does not match its manifest
  2  a usage or access error: bad arguments, no such bucket, refused credentials,
     a remote that cannot be read

Results go to stdout (a table, or one JSON document with --json); notes, warnings
and errors go to stderr. "ckptstore COMMAND --help" explains each command."""


class CommandError(Exception):
    """A subcommand cannot go on: the message for stderr, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


# --- options ---------------------------------------------------------------------------


def _storage_option(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
        # Never echo the value: it may be a secret.
        raise argparse.ArgumentTypeError("expected KEY=VALUE (e.g. anon=true)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip().split("."), value


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every subcommand takes, before or after its name.

    argparse lets a subcommand's defaults overwrite what was given before its
    name, so the two levels keep separate destinations, merged by :func:`execute`.
    """
    prefix = "top_" if top else ""
    group = parser.add_argument_group("options for every command")
    group.add_argument(
        "-o",
        "--storage-option",
        dest=prefix + "storage_option",
        action="append",
        type=_storage_option,
        metavar="KEY=VALUE",
        help="an option for the fsspec filesystem (repeatable), as the library's storage_options",
    )
    group.add_argument(
        "--json",
        dest=prefix + "json",
        action="store_true",
        default=None,
        help="print one JSON document on stdout instead of a table (keys: see the README)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest=prefix + "quiet",
        action="store_true",
        default=None,
        help="print only the result and errors (no notes on stderr)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest=prefix + "verbose",
        action="count",
        default=None,
        help="say more: every file, and ckptstore's log (-vv: its debug log too)",
    )


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, _terminal_width()))


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptstore", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    _add_common(parser, top=True)
    return parser


def command_parser(
    subparsers: Any, name: str, *, summary: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A subcommand's parser, with the shared options; ``add_parser`` of each module uses it."""
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=textwrap.dedent(description).strip(),
        epilog=textwrap.dedent(epilog).strip(),
        formatter_class=_Formatter,
    )
    _add_common(parser, top=False)
    return parser


def add_url_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("url", metavar="URL", help=what)


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 30m, 2h, 1d)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


# --- running a subcommand -----------------------------------------------------------------


class Output:
    """Where a subcommand's words go: results to stdout, notes and errors to stderr."""

    def __init__(self, *, json_mode: bool, quiet: bool, verbose: int, redactor: Redactor):
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose
        self.redactor = redactor

    def result(self, text: str = "") -> None:
        """A line of the human-readable result (stdout; not printed with --json)."""
        if not self.json_mode:
            print(self.redactor.scrub(text), flush=True)

    def note(self, text: str) -> None:
        """Something worth knowing about the result (stderr; not with -q)."""
        if not self.quiet:
            print(self.redactor.scrub(text), file=sys.stderr, flush=True)

    def detail(self, text: str) -> None:
        """What -v adds (stderr)."""
        if self.verbose and not self.quiet:
            print(self.redactor.scrub(text), file=sys.stderr, flush=True)

    def error(self, text: str) -> None:
        print(self.redactor.scrub(text), file=sys.stderr, flush=True)

    def document(self, doc: dict[str, Any]) -> None:
        """The one JSON document of --json (stdout)."""
        if self.json_mode:
            text = json.dumps(doc, indent=1, sort_keys=True, default=str)
            print(self.redactor.scrub(text), flush=True)


class _Scrubbing(logging.Filter):
    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor.scrub(record.getMessage())
        record.args = None
        return True


def _configure_logging(verbose: int, quiet: bool, redactor: Redactor) -> Callable[[], None]:
    """Send ckptstore's log to stderr, scrubbed, for one command; returns how to undo it."""
    logger = logging.getLogger("ckptstore")
    before = (logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_Scrubbing(redactor))
    logger.addHandler(handler)
    logger.propagate = False
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose)
    logger.setLevel(level if level is not None else logging.DEBUG)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]

    return undo


def _merge(args: argparse.Namespace, extra: dict[str, Any]) -> None:
    """Fold the options given before the subcommand's name into those given after it."""
    for name in ("json", "quiet"):
        setattr(args, name, bool(getattr(args, "top_" + name, None) or getattr(args, name, None)))
    args.verbose = (getattr(args, "top_verbose", None) or 0) + (getattr(args, "verbose", None) or 0)
    options: dict[str, Any] = dict(extra)
    given = (getattr(args, "top_storage_option", None) or []) + (
        getattr(args, "storage_option", None) or []
    )
    for keys, value in given:
        target = options
        for key in keys[:-1]:
            inner = target.get(key)
            if not isinstance(inner, dict):
                inner = target[key] = {}
            target = inner
        target[keys[-1]] = value
    args.storage_options = options


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: dict) -> int:
    """Run the parsed subcommand: set up output and logging, map failures to exit statuses."""
    _merge(args, extra)
    url = getattr(args, "url", "") or ""
    args.redactor = redactor = Redactor(url, args.storage_options)
    args.out = out = Output(
        json_mode=args.json, quiet=args.quiet, verbose=args.verbose, redactor=redactor
    )
    undo_logging = _configure_logging(args.verbose, args.quiet, redactor)
    try:
        return _run(args, out, redactor)
    finally:
        undo_logging()


def _run(args: argparse.Namespace, out: Output, redactor: Redactor) -> int:
    prog = f"ckptstore {args.command}"
    try:
        return int(args.run(args))
    except CommandError as exc:
        out.error(f"{prog}: {exc}")
        return exc.status
    except VerificationError as exc:
        out.error(f"{prog}: {exc}")
        return EXIT_INTEGRITY
    except CkptStoreError as exc:  # configuration, missing extra, remote unavailable, ownership
        out.error(f"{prog}: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        out.error(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:  # ``ckptstore ls ... | head``: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
    except Exception as exc:  # the client's own: no such bucket, refused credentials, network
        out.error(f"{prog}: {redactor.url or 'the remote'}: {redactor.describe(exc)}")
        if args.verbose > 1:
            import traceback

            out.error(redactor.scrub(traceback.format_exc()))
        return EXIT_USAGE


# --- the remote ---------------------------------------------------------------------------


def open_remote(args: argparse.Namespace) -> Remote:
    """The remote at ``args.url`` (a URL or a local path), built as the library builds it."""
    text = args.url
    backends.check_for_url_typos(text)
    absolute = text if backends.is_remote_url(text) else os.path.abspath(text)
    backend, root = backends.resolve(absolute, args.storage_options)
    return Remote(backend, root, args.redactor.url)


def check_found(remote: Remote, out: Output) -> None:
    """After a listing found nothing: an absent bucket is an error, an empty prefix is not.

    Raises:
        CommandError: the bucket does not exist or is not visible with these credentials.
    """
    fs = remote.fs
    if not remote.backend.needs_parent_dirs:  # object stores: the bucket must exist
        bucket = fs.split_path(remote.root)[0] if hasattr(fs, "split_path") else None
        if bucket and not CLI_RETRY.call(
            lambda: fs.exists(bucket),
            is_transient=remote.backend.is_transient,
            what=f"look for the bucket of {remote.url}",
        ):
            raise CommandError(
                f"{remote.url}: bucket {bucket!r} does not exist or is not visible with these "
                "credentials"
            )
    out.note(f"nothing stored under {remote.url}")


def transfer(args: argparse.Namespace, what: str, total: int) -> progress.Transfer:
    """The account of one transfer of ``total`` bytes (a pull's download, a push's upload).

    Give each file ``transfer.file()`` as its fsspec callback and call
    ``finish()`` at the end. A tqdm bar (on stderr, through fsspec's
    ``TqdmCallback``) is attached only when stdout is a terminal and ``-q`` was
    not given: a bar is for someone watching, never for a pipe or a log file
    (a script reading ``--json`` reads a pipe). No log lines either way
    (``log_every=None``): the command says what it did when it is done.
    """
    bar = None
    if not args.quiet and sys.stdout.isatty():
        bar = progress.tqdm_bar(args.redactor.scrub(what), total, auto=False)
    return progress.Transfer(what, total, bar=bar, log_every=None)


# --- formatting ---------------------------------------------------------------------------


def time_text(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def iso_time(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def table(
    rows: Sequence[Sequence[str]], *, right: Sequence[int] = (), indent: int = 2
) -> list[str]:
    """Rows as aligned text lines (the last column is not padded)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i == len(row) - 1:
                cells.append(cell)
            elif i in right:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell.ljust(widths[i]))
        lines.append(" " * indent + "  ".join(cells).rstrip())
    return lines


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def artifact_json(inventory: Inventory, a: Artifact) -> dict[str, Any]:
    """The stable JSON form of one artifact (``ls``, ``verify``, ``gc``; keys in the README)."""
    return {
        "url": inventory.url_of(a.location),
        "run": inventory.url_of(a.run),
        "name": a.name,
        "kind": a.kind,
        "number": a.number,
        "step": a.step,
        "time": a.time,
        "time_utc": iso_time(a.time),
        "bytes": a.bytes,
        "files": list(a.files),
        "committed": a.committed,
        "status": a.status,
        "collectable": a.collectable,
        "reason": a.reason or None,
    }


__all__ = [
    "CLI_RETRY",
    "EXIT_INTEGRITY",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Output",
    "add_url_argument",
    "artifact_json",
    "check_found",
    "command_parser",
    "execute",
    "open_remote",
    "parse_duration",
    "size_text",
    "table",
    "time_text",
    "top_parser",
    "transfer",
]
