"""Where a served model's files come from: a .mar (a zip, unpacked as a TorchServe worker unpacks it) or a model dir.

Every engine that loads models itself (KServe's model server, Ray Serve) and the offline commands read them here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MODEL_CONFIG = "model-config.yaml"
MANIFEST = "MAR-INF/MANIFEST.json"
# An archive unpacks to at most this many bytes: the imagenet archive is about 20 MB, a ResNet-152's 240 MB.
MAX_UNPACKED_BYTES = 2 * 1024**3


class ModelSourceError(ValueError):
    """MODEL is neither a .mar nor a model directory with model-config.yaml: the command line names the wrong thing."""


class DamagedArchive(ValueError):
    """MODEL is a .mar that cannot be read: truncated, not a zip, too large, or with members pointing outside it."""


@dataclass
class ModelSource:
    """A model's unpacked files, its name and version; `close()` removes what opening it added."""

    name: str
    model_dir: Path
    version: str | None = None
    _temporary: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def close(self) -> None:
        entry = str(self.model_dir)
        if entry in sys.path:
            sys.path.remove(entry)
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


def extract_archive(archive: Path, destination: Path) -> None:
    """Unzip a .mar, refusing members that would land outside `destination` (a zip may name '../x') and archives
    that would unpack to more than MAX_UNPACKED_BYTES."""
    try:
        with zipfile.ZipFile(archive) as mar:
            members = mar.infolist()
            for member in members:
                parts = PurePosixPath(member.filename).parts
                if PurePosixPath(member.filename).is_absolute() or ".." in parts:
                    raise DamagedArchive(f"{archive}: member {member.filename!r} points outside the archive")
            if sum(member.file_size for member in members) > MAX_UNPACKED_BYTES:
                raise DamagedArchive(f"{archive} would unpack to more than {MAX_UNPACKED_BYTES} bytes")
            mar.extractall(destination)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise DamagedArchive(f"{archive} is not a readable .mar (zip) archive, truncated or damaged: {error}") from None


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The archive's MAR-INF/MANIFEST.json `model` section; a plain model dir has none (empty dict)."""
    path = model_dir / MANIFEST
    return json.loads(path.read_text()).get("model", {}) if path.exists() else {}


def open_model_source(source: Path | str) -> ModelSource:
    """A .mar unpacked into a temporary dir, or a model dir as it is; its dir goes first on sys.path, as in a worker,
    so that a model file or package the archive carries is importable."""
    source = Path(source)
    temporary = None
    if source.is_dir():
        model_dir = source.resolve()
    elif source.is_file():
        temporary = tempfile.TemporaryDirectory(prefix="camserve-model-")
        model_dir = Path(temporary.name)
        try:
            extract_archive(source, model_dir)
        except DamagedArchive:
            temporary.cleanup()
            raise
    else:
        raise ModelSourceError(f"{source} does not exist")
    if not (model_dir / MODEL_CONFIG).is_file():
        if temporary is not None:
            temporary.cleanup()
        raise ModelSourceError(f"{source} has no {MODEL_CONFIG}: not a camserve model directory or archive")
    manifest = read_manifest(model_dir)
    name = manifest.get("modelName") or (source.stem if source.is_file() else source.name)
    sys.path.insert(0, str(model_dir))
    return ModelSource(name=name, model_dir=model_dir, version=manifest.get("modelVersion"), _temporary=temporary)
