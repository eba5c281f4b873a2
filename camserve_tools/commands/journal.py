"""explanations.jsonl: one line per image, appended as images are done, read back to resume an interrupted run.

The file is the run's only state. A line is written once the image's output files are on disk, so a line means
"done"; a run killed mid-line leaves a partial last line, which the next run cuts off before appending. When a
path has several lines (an image retried with --retry-failed), the last one counts.

The journal is read line by line, each line bounded, and only as a regular file: whatever sits at its name, no
read takes more memory than one line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, TextIO

# One line holds one answer: the endpoint's JSON, bounded by the answer size limit (a few MB), with room to spare.
MAX_LINE_BYTES = 64 * 1024 * 1024
_TAIL_CHUNK = 64 * 1024


class JournalError(ValueError):
    """The file at the journal's name is not a journal this command can resume: not a regular file, or a line
    far longer than any answer."""


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.statuses: dict[str, int] = self._read_statuses()

    def _exists(self) -> bool:
        """Whether a journal is there; anything else at its name is a JournalError."""
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(mode):
            raise JournalError(f"{self.path} is not a regular file: not a journal of this command")
        return True

    def _read_statuses(self) -> dict[str, int]:
        """path -> HTTP status of its last complete line."""
        statuses: dict[str, int] = {}
        if not self._exists():
            return statuses
        with self.path.open("rb") as lines:
            while raw := lines.readline(MAX_LINE_BYTES + 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise JournalError(f"{self.path} has a line over {MAX_LINE_BYTES} bytes: not a journal of this command")
                if not raw.endswith(b"\n"):
                    break  # the partial last line of an interrupted run
                try:
                    line = json.loads(raw)
                    statuses[str(line["path"])] = int(line["status"])
                except (ValueError, KeyError, TypeError, RecursionError):
                    continue
        return statuses

    def is_done(self, path: str, retry_failed: bool = False) -> bool:
        status = self.statuses.get(path)
        return status is not None and not (retry_failed and status != 200)

    def open_for_append(self) -> TextIO:
        """The journal, ready to append: a partial last line (an interrupted write) is cut off first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._exists():
            with self.path.open("rb+") as raw:
                raw.truncate(_complete_length(raw))
        return self.path.open("a", encoding="utf-8")

    def record(self, out: TextIO, line: dict[str, Any]) -> None:
        out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.statuses[str(line["path"])] = int(line["status"])


def _complete_length(file: Any) -> int:
    """The length of the file up to and including its last newline, reading backwards from the end in chunks."""
    end = file.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        file.seek(start)
        chunk = file.read(position - start)
        if position == end and chunk.endswith(b"\n"):
            return end
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0
