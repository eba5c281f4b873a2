"""`camserve archive ARGS`: build a .mar - exactly the archive builder's command line (scripts/build_archive.py).

Every argument goes to the builder's own parser, so the command takes whatever the builder takes, now and after it
learns more model forms. `--json` (taken out before the builder sees the rest) prints {"archive": path}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from typing import Any

from camserve_tools.commands.common import EXIT_FAILED, EXIT_OK

HELP = "build a .mar archive (make archive); `camserve archive --help` lists the builder's options"
EPILOG = "exit codes: 0 built; 1 the build failed (the archiver, the weights, the labels); 2 usage error"


def register(subparsers: Any) -> None:
    # Listed for `camserve --help`; camserve_tools.cli hands `archive` calls to run_with before any parsing.
    parser = subparsers.add_parser("archive", help=HELP, description=__doc__, epilog=EPILOG, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=lambda args: run_with([], prog="camserve archive"))


def run_with(argv: list[str], prog: str) -> int:
    """Hand `argv` to the archive builder's main(argv); its SystemExit codes pass through (argparse's 2 included)."""
    from scripts import build_archive

    as_json = "--json" in argv
    argv = [arg for arg in argv if arg != "--json"]
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__}\n{EPILOG}\n", file=sys.stderr if as_json else sys.stdout)
    printed = io.StringIO()
    try:
        with _stdout_to_stderr() if as_json else contextlib.nullcontext(), contextlib.redirect_stdout(printed) if as_json else contextlib.nullcontext():
            build_archive.main(argv, prog=prog)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(f"{prog}: failed: {exit_.code}", file=sys.stderr)
            return EXIT_FAILED
        return int(exit_.code or 0)
    except subprocess.CalledProcessError as error:
        print(f"{prog}: failed: the model archiver exited with {error.returncode}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError, KeyError) as error:
        print(f"{prog}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        lines = printed.getvalue().strip().splitlines()
        print(json.dumps({"archive": lines[-1] if lines else None}))
    return EXIT_OK


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 onto 2 for a while: the archiver's subprocess output stays off a JSON stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
