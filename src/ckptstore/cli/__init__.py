"""The ``ckptstore`` command: see, check and tidy what a remote holds, from a shell.

Also ``python -m ckptstore``. Every subcommand is a module ``ckptstore.cli.<name>``
with two functions, and one line in :data:`SUBCOMMANDS` registers it:

* ``add_parser(subparsers) -> argparse.ArgumentParser``: add its parser, made
  with :func:`ckptstore.cli.common.command_parser` so that it takes the options
  every subcommand shares (``--json``, ``-o KEY=VALUE``, ``-q``, ``-v``);
* ``run(args) -> int``: do the work and return the exit status.

Only the module of the subcommand being run is imported (``ckptstore --help``
lists the others from :data:`SUBCOMMANDS` alone), so ``ckptstore ls`` never
imports what another subcommand needs. ``ls``, ``verify`` and ``gc`` import no
TensorFlow at all; a subcommand that reads or writes tensors imports it inside
``run``.

Exit status, for every subcommand: :data:`EXIT_OK` (0), :data:`EXIT_INTEGRITY`
(1: a stored file does not match its manifest, a refused checkpoint) and
:data:`EXIT_USAGE` (2: bad arguments, no such bucket, refused credentials, a
remote that cannot be read).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Subcommand:
    name: str  # also the module: ckptstore.cli.<name>
    summary: str  # one line for ``ckptstore --help``


#: The subcommands, in the order ``ckptstore --help`` lists them.
SUBCOMMANDS: list[Subcommand] = [
    Subcommand("ls", "list checkpoints, SavedModels and Keras files, and what is left over"),
    Subcommand("verify", "check stored artifacts against their manifests (exit 1 on a mismatch)"),
    Subcommand("gc", "delete what interrupted uploads left behind (a dry run unless --yes)"),
    Subcommand("pull", "download and verify a checkpoint into a directory TensorFlow reads"),
    Subcommand("push", "upload a TensorFlow checkpoint directory or SavedModel, and commit it"),
]


def _selected(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option or its value)."""
    from ckptstore.cli.common import OPTIONS_WITH_VALUES

    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--":
            return None
        elif token in OPTIONS_WITH_VALUES:
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def build_parser(selected: str | None = None) -> Any:
    """The argument parser; only ``selected``'s module is imported to add its arguments."""
    from ckptstore.cli import common

    parser = common.top_parser()
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for sub in SUBCOMMANDS:
        if sub.name == selected:
            module = importlib.import_module(f"ckptstore.cli.{sub.name}")
            module.add_parser(subparsers).set_defaults(run=module.run)
        else:  # listed in --help; its module is imported only when it is the one run
            subparsers.add_parser(sub.name, help=sub.summary, add_help=False)
    return parser


def main(
    argv: Sequence[str] | None = None, *, storage_options: Mapping[str, Any] | None = None
) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    ``storage_options`` are merged under the ``-o KEY=VALUE`` options: a way in
    for what a command line cannot carry (``{"google_auth": gauth}`` for
    ``gdrive://`` in a notebook)::

        ckptstore.cli.main(["ls", "gdrive://root/ckpts"], storage_options={"google_auth": gauth})
    """
    from ckptstore.cli import common

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_selected(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return common.execute(args, parser, dict(storage_options or {}))
