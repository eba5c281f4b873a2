"""Reading a file a user named, without trusting the name: regular files only, and never more than a limit.

The offline commands read paths that come from command lines, list files and annotation files. A name can point
at a device (`/dev/zero` never ends), a FIFO (a read blocks until someone writes) or a file far larger than any
input; each is refused with an error that says which, before more than `limit` bytes are read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# What a served config accepts as one request body (config/*.properties max_request_size): an offline command
# takes no larger image than the server would.
MAX_IMAGE_BYTES = 32 * 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefused(ValueError):
    """A file that is not read: not a regular file, or over the size limit. `status` is the HTTP status a server
    gives the same problem (413 for too large, else 400), `kind` a short machine-readable name."""

    def __init__(self, message: str, kind: str, status: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


def _not_regular(path: Path, mode: int) -> FileRefused:
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return FileRefused(f"{path} is {what}, not a regular file", "not_a_regular_file", 400)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path` (symlinks followed), at most `limit` of them, else FileRefused.

    The type is checked before opening (opening a device can itself have effects) and again on the open file
    (the name may have been swapped in between); the open never blocks (O_NONBLOCK: a FIFO opens at once, and is
    then refused). OSError passes through for a file that is missing or unreadable."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode)
    if info.st_size > limit:
        raise FileRefused(f"{path} is {info.st_size} bytes, over the limit of {limit}", "file_too_large", 413)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        data = file.read(limit + 1)
    if len(data) > limit:  # it grew since the stat
        raise FileRefused(f"{path} is over the limit of {limit} bytes", "file_too_large", 413)
    return data


def is_regular_file(path: Path) -> bool:
    """Whether `path` (symlinks followed) is a regular file; False when it is missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a name with a NUL byte
        return False
