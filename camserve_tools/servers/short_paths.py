"""Short private folders under /tmp, for servers that put Unix sockets in their temp dir.

A Unix socket's path holds at most 107 bytes (sun_path is 108 with its NUL). TorchServe's frontend names each
worker's socket `<java.io.tmpdir>/.ts.sock.<port>` and Ray puts its sockets deep inside its session dir, so both need
a temp dir whose path is short whatever TMPDIR or the run dir is (CI runners and macOS have long ones).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

UNIX_SOCKET_PATH_MAX = 107


def short_private_dir(prefix: str, longest_inside: str) -> Path:
    """A fresh private folder of /tmp where /tmp is writable, else of the temp dir, named `prefix...`. An error
    names the limit when even its path plus `longest_inside` (the longest socket path a server makes inside it)
    is over what a Unix socket path may hold."""
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if len(os.fsencode(f"{directory}{longest_inside}")) > UNIX_SOCKET_PATH_MAX:
        directory.rmdir()
        raise RuntimeError(
            f"no short path for a server's Unix sockets: {directory}{longest_inside} is over the {UNIX_SOCKET_PATH_MAX} bytes "
            "a Unix socket path may have; make /tmp writable or set a shorter TMPDIR"
        )
    return directory


def is_private_dir(directory: Path, prefix: str) -> bool:
    """Whether `directory` is one that short_private_dir made: a plain folder (never a symlink) named `prefix...`,
    whatever a record in a run dir says."""
    try:
        mode = os.lstat(directory).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and directory.name.startswith(prefix)


def remove_private_dir(directory: Path, prefix: str) -> None:
    """Remove `directory` if it is one that short_private_dir made (see is_private_dir); anything else stays."""
    if is_private_dir(directory, prefix):
        shutil.rmtree(directory, ignore_errors=True)  # unlinks symlinks inside, never follows them
