"""A served model in this process: a .mar or a model directory -> its CamPipeline, without any server.

The offline commands (`camserve explain`, `camserve evaluate`) answer through the very pipeline every engine runs,
so their JSON is the endpoint's JSON. The model is loaded as a worker loads it: a .mar (a zip) is extracted into a
temporary directory, that directory goes first on sys.path (so a model file or package the archive carries is
importable, as in the worker), and the pipeline is built from its model-config.yaml. Modules this process has
imported already (the `camserve` package itself) are not imported again from the archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camserve.model_source import ModelSource, open_model_source
from camserve.pipeline import CamPipeline, Row


@dataclass
class LocalModel:
    """A loaded pipeline and where its files are; `close()` removes what opening it added."""

    source: ModelSource
    pipeline: CamPipeline

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def model_dir(self) -> Path:
        return self.source.model_dir

    @property
    def labels(self) -> list[str]:
        return self.pipeline.labels

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(source: Path, **settings: Any) -> LocalModel:
    """Load MODEL (a .mar or a model directory) into a pipeline, as a worker would (`settings`: CamPipeline's)."""
    opened = open_model_source(source)
    try:
        return LocalModel(opened, CamPipeline.from_model_dir(opened.model_dir, **settings))
    except BaseException:
        opened.close()
        raise


def answer_rows(pipeline: CamPipeline, bodies: list[bytes], headers: list[dict[str, str]]) -> list[tuple[int, Any]]:
    """One batch of images through the pipeline, as a server runs them: each one's (HTTP status, JSON answer or bytes)."""
    lowered = [{key.lower(): value for key, value in h.items()} for h in headers]
    answers = pipeline.answer([[Row(fields={"body": body}, headers=h)] for body, h in zip(bodies, lowered, strict=True)])
    return [(answer.status, answer.body) for (answer,) in answers]


def answer_cams(answer: Any) -> list[dict[str, Any]]:
    """The maps of an answer as a list: the endpoint sends one map as an object, several as a list."""
    cam = answer.get("cam") if isinstance(answer, dict) else None
    return cam if isinstance(cam, list) else [cam] if isinstance(cam, dict) else []


def answer_batch(pipeline: CamPipeline, bodies: list[Any], headers: list[dict[str, str]]) -> list[tuple[int, Any]]:
    """Each body's (status, answer): the bytes through the pipeline in one batch, as the server runs them; a
    file that could not be read (camserve_tools.commands.inputs.read_image's error) keeps its error."""
    readable = [index for index, body in enumerate(bodies) if isinstance(body, bytes)]
    answered = answer_rows(pipeline, [bodies[i] for i in readable], [headers[i] for i in readable]) if readable else []
    results: list[tuple[int, Any]] = [(body["code"], body) if isinstance(body, dict) else (0, None) for body in bodies]
    for index, result in zip(readable, answered, strict=True):
        results[index] = result
    return results
