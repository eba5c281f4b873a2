"""explanations.jsonl: one line per image, appended as images are done, read back to resume an interrupted run.

The file is the run's only state. A line is written once the image's output files are on disk, so a line means
"done"; a run killed mid-line leaves a partial last line, which the next run cuts off before appending. When a
path has several lines (an image retried with --retry-failed), the last one counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.statuses: dict[str, int] = self._read_statuses()

    def _read_statuses(self) -> dict[str, int]:
        """path -> HTTP status of its last complete line."""
        statuses: dict[str, int] = {}
        if not self.path.exists():
            return statuses
        with self.path.open("rb") as lines:
            for raw in lines:
                if not raw.endswith(b"\n"):
                    break  # the partial last line of an interrupted run
                try:
                    line = json.loads(raw)
                    statuses[str(line["path"])] = int(line["status"])
                except (ValueError, KeyError, TypeError):
                    continue
        return statuses

    def is_done(self, path: str, retry_failed: bool = False) -> bool:
        status = self.statuses.get(path)
        return status is not None and not (retry_failed and status != 200)

    def open_for_append(self) -> TextIO:
        """The journal, ready to append: a partial last line (an interrupted write) is cut off first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open("rb+") as raw:
                data = raw.read()
                if data and not data.endswith(b"\n"):
                    raw.truncate(data.rfind(b"\n") + 1)
        return self.path.open("a", encoding="utf-8")

    def record(self, out: TextIO, line: dict[str, Any]) -> None:
        out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.statuses[str(line["path"])] = int(line["status"])
