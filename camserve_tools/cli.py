"""`camserve`: the commands a pipeline calls - serve, stop, archive, explain, evaluate, smoke.

    camserve serve                       # TorchServe with model_store/shapes.mar in the background (make serve)
    camserve stop                        # stop exactly that server (make stop)
    camserve archive --name shapes ...   # build a .mar (make archive; the archive builder's own options)
    camserve explain MODEL INPUTS... --out DIR     # offline batch explanations, resumable
    camserve evaluate MODEL DATA --boxes FILE --out DIR [--min top1=0.9 ...]   # quality gate on a labelled set
    camserve smoke ARCHIVE.mar           # serve the archive alone, probe it, stop: before promoting it

Every command prints a table, or a JSON report with --json. Exit codes, the same for all:
0 all done; 1 the work ran and something failed (an image, a threshold, a probe); 2 usage error.
See docs/cli.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from camserve_tools.commands import archive, evaluate, explain, serve, smoke
from camserve_tools.commands.common import EXIT_FAILED, EXIT_USAGE, CommandFailed, UsageError

PROG = "camserve"
COMMANDS = (serve, archive, explain, evaluate, smoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns (and, as a script, exits with) its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["archive"]:
        # Every argument belongs to the archive builder's own parser: nothing here may consume one.
        return archive.run_with(argv[1:], prog=f"{PROG} archive")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Errors only, unless asked: TorchServe's handler module warns about optional runtimes at import, and the
    # handler logs every rejected image, which the commands report themselves.
    logging.basicConfig(level=logging.WARNING if getattr(args, "verbose", False) else logging.ERROR, format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as error:
        print(f"{PROG} {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
