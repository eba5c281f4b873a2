"""A served model in this process: a .mar or a model directory -> an initialised CamHandler, without TorchServe.

The offline commands (`camserve explain`, `camserve evaluate`) answer through the very handler code the server
runs, so their JSON is the endpoint's JSON. The model is loaded as a TorchServe worker loads it: a .mar (a zip) is
extracted into a temporary directory, that directory goes first on sys.path (so a model file or package the archive
carries is importable, as in the worker), and the handler is initialised with a context that reads the archive's
manifest and model-config.yaml. Modules this process has imported already (the `camserve` package itself) are not
imported again from the archive.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

MODEL_CONFIG = "model-config.yaml"
MANIFEST = "MAR-INF/MANIFEST.json"


class ModelSourceError(ValueError):
    """MODEL is neither a .mar nor a model directory with model-config.yaml: the command line names the wrong thing."""


class DamagedArchive(ValueError):
    """MODEL is a .mar that cannot be read: truncated, not a zip, or with members pointing outside it."""


@dataclass
class LocalModel:
    """An initialised handler and where its files are; `close()` removes what opening it added."""

    name: str
    model_dir: Path
    handler: Any  # camserve.serving.handler.CamHandler
    _temporary: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return self.handler.labels

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


def open_model(source: Path, *, handler_class: Any = None) -> LocalModel:
    """Load MODEL (a .mar or a model directory) into an initialised handler, as a TorchServe worker would."""
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
        handler = _initialised_handler(model_dir, name, manifest, handler_class)
    except BaseException:
        if str(model_dir) in sys.path:
            sys.path.remove(str(model_dir))
        if temporary is not None:
            temporary.cleanup()
        raise
    return LocalModel(name=name, model_dir=model_dir, handler=handler, _temporary=temporary)


def _initialised_handler(model_dir: Path, name: str, manifest: dict[str, Any], handler_class: Any) -> Any:
    from camserve_tools.local_handler import initialised_handler

    config = yaml.safe_load((model_dir / MODEL_CONFIG).read_text()) or {}
    weights = manifest.get("serializedFile") or (config.get("handler") or {}).get("weights")
    return initialised_handler(model_dir, weights, name, handler_class)


def batch_context(headers: list[dict[str, str]]) -> Any:
    """A fresh per-batch context, one request's headers per row, as TorchServe gives the handler each batch."""
    from camserve_tools import local_handler

    return local_handler.batch_context(headers)


def handle_batch(handler: Any, bodies: list[bytes], headers: list[dict[str, str]]) -> list[tuple[int, Any]]:
    """One batch through handler.handle, as the server runs it: each row's (HTTP status, answer)."""
    context = batch_context(headers)
    answers = handler.handle([{"body": body} for body in bodies], context)
    return [(context.get_response_status(index)[0], answer) for index, answer in enumerate(answers)]


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


def answer_batch(handler: Any, bodies: list[Any], headers: list[dict[str, str]]) -> list[tuple[int, Any]]:
    """Each body's (status, answer): the bytes through handler.handle in one batch, as the server runs them; a
    file that could not be read (read_input's error) keeps its error."""
    readable = [index for index, body in enumerate(bodies) if isinstance(body, bytes)]
    answered = handle_batch(handler, [bodies[i] for i in readable], [headers[i] for i in readable]) if readable else []
    results: list[tuple[int, Any]] = [(body["code"], body) if isinstance(body, dict) else (0, None) for body in bodies]
    for index, result in zip(readable, answered):
        results[index] = result
    return results
