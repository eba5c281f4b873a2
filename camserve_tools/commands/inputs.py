"""INPUTS of the offline commands -> the image files they name: images, folders (recursive), or lists of paths.

A pipeline hands over whatever it has: a folder, a few files, or a text file written by an earlier step, one path
a line. Relative paths in a list are relative to the list file's own folder, so a list travels with its images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from camserve_tools.bounded_files import MAX_IMAGE_BYTES, FileRefused, read_bounded

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_LIST_BYTES = 64 * 1024 * 1024  # a list file: about a million paths


class InputError(ValueError):
    """An INPUT on the command line that does not exist or cannot be read."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def images_in_folder(folder: Path) -> list[Path]:
    """Every file with an image extension under `folder`, recursively, in a stable (sorted) order."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and is_image_name(path))


def paths_in_list(list_file: Path) -> list[Path]:
    """The paths a text file lists, one a line (images or folders); blank lines and lines starting with '#' are
    skipped. Listed paths are kept even when missing: the run then reports each as a failed image, and goes on."""
    try:
        text = read_bounded(list_file, MAX_LIST_BYTES).decode()
    except (OSError, UnicodeDecodeError, FileRefused) as error:
        raise InputError(f"{list_file}: not a readable list of paths ({error})") from None
    base = list_file.parent
    listed = (line.strip() for line in text.splitlines())
    return [(base / line) if not Path(line).is_absolute() else Path(line) for line in listed if line and not line.startswith("#")]


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """The absolute paths of the images INPUTS name, each once, in the order given (folders sorted)."""
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found += images_in_folder(path)
        elif is_image_name(path):
            if not path.exists():
                raise InputError(f"{path}: no such image")
            found.append(path)
        elif path.is_file():
            for listed in paths_in_list(path):
                found += images_in_folder(listed) if listed.is_dir() else [listed]
        elif path.exists():
            raise InputError(f"{path}: not a regular file or folder (a device, a FIFO or a socket is never read)")
        else:
            raise InputError(f"{path}: no such image, folder or list file")
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in found))


def read_image(path: Path) -> bytes | dict[str, Any]:
    """The file's bytes, or the JSON error the file gets instead, as a server would answer it: a path that cannot
    be read (a missing path from a list file, say) or that is not a regular file (a device, a FIFO) gets a 400, a
    file over the server's request size limit a 413; none is read past that limit."""
    try:
        return read_bounded(path, MAX_IMAGE_BYTES)
    except FileRefused as refused:
        return {"code": refused.status, "type": refused.kind, "message": str(refused)}
    except OSError as error:
        return {"code": 400, "type": "unreadable_file", "message": f"cannot read {path}: {error.strerror or error}"}
