"""What every subcommand shares: exit codes, usage errors, reports as a table or JSON, and progress bars.

Exit codes are the same for every command, so a pipeline can branch on them without reading the output:
0 all done, 1 the work ran and something failed (an image, a threshold, a probe), 2 a usage error (bad arguments,
missing files) - argparse's own code for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

EXIT_CODES_HELP = "exit codes: 0 all done; 1 {failed}; 2 usage error (bad arguments, missing files)"


def add_command(subparsers: Any, name: str, summary: str, description: str | None, exit_codes: str) -> argparse.ArgumentParser:
    """A subcommand's parser: `summary` in `camserve --help`, `description` (its module's docstring, as written)
    above its options, `exit_codes` below them."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=description, epilog=exit_codes, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser


def exit_status(ok: bool) -> int:
    """EXIT_OK where the work all went well, else EXIT_FAILED."""
    return EXIT_OK if ok else EXIT_FAILED


def exit_codes(failed: str) -> str:
    """The exit codes of a command that does a set of things: `failed` says when it exits 1."""
    return EXIT_CODES_HELP.format(failed=failed)


T = TypeVar("T")


class UsageError(Exception):
    """The command line asks for something that cannot be done as asked: exit 2, with this message."""


class CommandFailed(Exception):
    """The command could not do its work (a model that cannot load, a broken archive): exit 1, with this message."""


def check_out_dir(out: Path) -> Path:
    """--out as a folder the command can create or fill, checked before any work; its absolute path.

    An existing file, a path through a file, or a folder that cannot be written is a usage error: found here, not
    as a traceback after the work is done. Nothing is created yet."""
    out = Path(os.path.abspath(out))
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a symlink to nothing")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {existing} is not writable")
    return out


def add_output_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON report on stdout instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--verbose", action="store_true", help="log warnings too (the handler's rejections, TorchServe's notes)")


def progress(
    items: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "image"
) -> Any:
    """A tqdm bar on stderr (stdout stays clean for --json); silent with --quiet."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of values as an aligned plain-text table, for people; floats with 3 decimals."""
    if not rows:
        return "(nothing)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return str(value)


def key_values(report: dict[str, Any]) -> str:
    """A flat report as `key  value` lines."""
    return format_table([{"key": key, "value": value} for key, value in report.items()], ("key", "value"))


def emit(report: dict[str, Any], as_json: bool, table: str) -> None:
    """The report on stdout: JSON for machines, or the given table for people."""
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(table)
