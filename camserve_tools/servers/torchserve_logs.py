"""What TorchServe's own logs say about a start that went wrong.

TorchServe appends to its logs, so each reader takes the byte offset where this start began: only what this start
wrote can tell whether it failed. A worker that cannot load its handler leaves /ping healthy and requests hanging,
and a frontend that gave up on an archive serves on without it; these readers turn both into an error at once.
"""

from __future__ import annotations

from pathlib import Path

# TorchServe prefixes each line a worker prints with its logger's header; the worker's message follows this.
MODEL_LOG_MARKER = "MODEL_LOG - "
# How many lines after a worker's death its traceback can take.
TRACEBACK_LINES = 80


def lines_since(log: Path, offset: int) -> list[str]:
    """The lines `log` got after byte `offset` (none when it does not exist)."""
    if not log.exists():
        return []
    with log.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace").splitlines()


def size_of(log: Path) -> int:
    """Where what a start writes next into `log` begins."""
    return log.stat().st_size if log.exists() else 0


def registration_failure(frontend_log: Path, offset: int) -> str | None:
    """What the frontend said when it failed to load an archive of --models, if it did: it logs
    `Failed to load model: <archive>` and the exception on the next line, then serves without that model."""
    lines = lines_since(frontend_log, offset)
    for number, line in enumerate(lines):
        if "Failed to load model:" in line:
            archive = line.split("Failed to load model:", 1)[1].strip()
            cause = lines[number + 1].strip() if number + 1 < len(lines) else ""
            return f"{archive}: {cause[:300]}" if cause else archive
    return None


def worker_failure(model_log: Path, offset: int) -> str | None:
    """The error line of the first worker traceback written to the model log, if a worker died."""
    lines = lines_since(model_log, offset)
    died = next((i for i, line in enumerate(lines) if "Backend worker process died" in line), None)
    if died is None:
        return None
    following = lines[died + 1 : died + TRACEBACK_LINES]
    trace = [line.split(MODEL_LOG_MARKER, 1)[-1] for line in following if MODEL_LOG_MARKER in line]
    errors = [line for line in trace if line and not line.startswith((" ", "Traceback")) and ("Error" in line or "Exception" in line)]
    return errors[0] if errors else "see the traceback"
