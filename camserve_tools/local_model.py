"""A served model in this process: a .mar or a model directory -> its CamPipeline, without any server.

The offline commands (`camserve explain`, `camserve evaluate`) answer through the very pipeline every engine runs,
so their JSON is the endpoint's JSON. The model is loaded as a worker loads it: a .mar (a zip) is extracted into a
temporary directory, that directory goes first on sys.path (so a model file or package the archive carries is
importable, as in the worker), and the pipeline is built from its model-config.yaml. Modules this process has
imported already (the `camserve` package itself) are not imported again from the archive.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from camserve.pipeline import CamPipeline, Row

MODEL_CONFIG = "model-config.yaml"
MANIFEST = "MAR-INF/MANIFEST.json"


class ModelSourceError(ValueError):
    """MODEL is neither a .mar nor a model directory with model-config.yaml: the command line names the wrong thing."""


class DamagedArchive(ValueError):
    """MODEL is a .mar that cannot be read: truncated, not a zip, or with members pointing outside it."""


@dataclass
class LocalModel:
    """A loaded pipeline and where its files are; `close()` removes what opening it added."""

    name: str
    model_dir: Path
    pipeline: CamPipeline
    version: str | None = None
    _temporary: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return self.pipeline.labels

    def close(self) -> None:
        entry = str(self.model_dir)
        if entry in sys.path:
            sys.path.remove(entry)
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def extract_archive(archive: Path, destination: Path) -> None:
    """Unzip a .mar, refusing members that would land outside `destination` (a zip may name '../x')."""
    try:
        with zipfile.ZipFile(archive) as mar:
            for member in mar.namelist():
                parts = PurePosixPath(member).parts
                if PurePosixPath(member).is_absolute() or ".." in parts:
                    raise DamagedArchive(f"{archive}: member {member!r} points outside the archive")
            mar.extractall(destination)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise DamagedArchive(f"{archive} is not a readable .mar (zip) archive, truncated or damaged: {error}") from None


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The archive's MAR-INF/MANIFEST.json `model` section; a plain model dir has none (empty dict)."""
    path = model_dir / MANIFEST
    return json.loads(path.read_text()).get("model", {}) if path.exists() else {}


def open_model(source: Path, **settings: Any) -> LocalModel:
    """Load MODEL (a .mar or a model directory) into a pipeline, as a worker would (`settings`: CamPipeline's)."""
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
    try:
        if not (model_dir / MODEL_CONFIG).is_file():
            raise ModelSourceError(f"{source} has no {MODEL_CONFIG}: not a camserve model directory or archive")
        manifest = read_manifest(model_dir)
        name = manifest.get("modelName") or (source.stem if source.is_file() else source.name)
        sys.path.insert(0, str(model_dir))  # as the worker: the archive's own modules are importable
        pipeline = CamPipeline.from_model_dir(model_dir, **settings)
    except BaseException:
        if str(model_dir) in sys.path:
            sys.path.remove(str(model_dir))
        if temporary is not None:
            temporary.cleanup()
        raise
    return LocalModel(name=name, model_dir=model_dir, pipeline=pipeline, version=manifest.get("modelVersion"), _temporary=temporary)


def answer_rows(pipeline: CamPipeline, bodies: list[bytes], headers: list[dict[str, str]]) -> list[tuple[int, Any]]:
    """One batch of images through the pipeline, as a server runs them: each one's (HTTP status, JSON answer or bytes)."""
    lowered = [{key.lower(): value for key, value in h.items()} for h in headers]
    answers = pipeline.answer([[Row(fields={"body": body}, headers=h)] for body, h in zip(bodies, lowered, strict=True)])
    return [(answer.status, answer.body) for (answer,) in answers]


def answer_cams(answer: Any) -> list[dict[str, Any]]:
    """The maps of an answer as a list: the endpoint sends one map as an object, several as a list."""
    cam = answer.get("cam") if isinstance(answer, dict) else None
    return cam if isinstance(cam, list) else [cam] if isinstance(cam, dict) else []


def read_input(path: Path) -> bytes | dict[str, Any]:
    """The file's bytes, or the JSON error an unreadable file gets (a missing path from a list file, say)."""
    try:
        return path.read_bytes()
    except OSError as error:
        return {"code": 400, "type": "unreadable_file", "message": f"cannot read {path}: {error.strerror or error}"}


def answer_batch(pipeline: CamPipeline, bodies: list[Any], headers: list[dict[str, str]]) -> list[tuple[int, Any]]:
    """Each body's (status, answer): the bytes through the pipeline in one batch, as the server runs them; a
    file that could not be read (read_input's error) keeps its error."""
    readable = [index for index, body in enumerate(bodies) if isinstance(body, bytes)]
    answered = answer_rows(pipeline, [bodies[i] for i in readable], [headers[i] for i in readable]) if readable else []
    results: list[tuple[int, Any]] = [(body["code"], body) if isinstance(body, dict) else (0, None) for body in bodies]
    for index, result in zip(readable, answered):
        results[index] = result
    return results
