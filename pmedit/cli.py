"""The ``pmedit`` command line: one sub-command per module under pmedit/commands/.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``pmedit --help``
does not import torch.

Failures a user can act on (``ValueError``, ``OSError`` such as a missing file or a full or
read-only disk, a missing optional package) end as one line on stderr,
``pmedit CMD: error: ...``, naming the culprit, with exit code 2 (argparse's code for bad
arguments); Ctrl-C ends with 130. ``-v`` adds the traceback to the debug log. Anything else is
a bug in pmedit and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "edit": ("pmedit.commands.edit", "edit facts in a model and show completions before/after"),
    "stats": ("pmedit.commands.stats", "collect (or import) C0 second-moment statistics"),
    "experiment": ("pmedit.commands.experiment", "run an experiment of the batch-size study"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage error as one line (the usage itself is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="pmedit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:  # only the command that runs pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:
        print(f"pmedit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ModuleNotFoundError) as e:
        logging.getLogger("pmedit").debug("pmedit %s failed", args.command, exc_info=True)
        print(f"pmedit {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2


def error_line(e: BaseException) -> str:
    """The exception as one line (safe to print on any terminal)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text += f": {e.filename}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
