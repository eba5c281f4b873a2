"""Model forms: every form a classifier arrives in -> a model dir (weights, labels, model-config.yaml) -> a checked
archive (camserve_tools.archive.packing).

Forms (`make archive` variables in brackets):
- a torchvision builder and a state dict or torchvision weights name   [MODEL=resnet18 WEIGHTS=...]
- timm, by name, and a state dict                                      [MODEL=timm:<name> WEIGHTS=...]
- TorchServe's convention: a model file and a state dict               [MODEL_FILE=model.py [CLASS=Name] WEIGHTS=... [EXTRA_FILES=...]]
- a torch.export program                                               [EXPORTED=model.pt2]
Common: LABELS, NAME, INPUT_SIZE, MEAN, STD, METHOD, LAYER. What a form does not say (input size, normalisation,
method, topk) defaults to ModelSpec's own defaults, so an archive and a hand-written model-config agree.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from camserve.model_spec import EXPORTED, ModelSpec, without_auxiliary_heads
from camserve_tools.archive.checks import ArchiveError, check_model_name
from camserve_tools.archive.packing import ROOT, archive_model_dir, checked_archive
from camserve_tools.archive.user_files import (
    classes_of,
    existing_file,
    first_line,
    given,
    is_torchscript,
    labels_mapping,
    load_state_dict,
    model_file_class,
    torchscript_error,
)

# TorchServe worker settings of a generated model-config.yaml (the benchmark overrides them per run).
WORKER_SETTINGS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 20, "responseTimeout": 120}
# torchvision's own evaluation side for inception_v3; every other builder takes ModelSpec's default input size.
TORCHVISION_SIDES = {"inception_v3": 299}

Triple = tuple[float, float, float]


@dataclass
class ArchiveRequest:
    """One `make archive` call: the model's form and the common options (None: the form's default)."""

    model: str | None = None  # a torchvision builder ("resnet18", "torchvision:resnet18") or "timm:<name>"
    model_file: Path | None = None
    class_name: str | None = None
    weights: str | None = None  # a state-dict file (for torchvision also a weights name)
    exported: Path | None = None
    extra_files: tuple[Path, ...] = ()
    labels: Path | None = None
    name: str | None = None
    input_size: tuple[int, int] | None = None
    mean: Triple | None = None
    std: Triple | None = None
    method: str | None = None
    layers: tuple[str, ...] = ()
    extra_settings: dict[str, Any] = field(default_factory=dict)


def triple(values: Any) -> Triple:
    """A library's (r, g, b) normalisation (a list or tuple of numbers) as model_config takes it."""
    red, green, blue = (float(value) for value in values)
    return red, green, blue


class FormModelDir(NamedTuple):
    """What writing a form's model dir gives the packing: the archive's default name, and for a model file the
    file and its extra files (TorchServe's --model-file and --extra-files)."""

    name: str
    model_file: Path | None = None
    extra_files: tuple[Path, ...] = ()


def form_of(request: ArchiveRequest) -> str:
    """Which form the request is, after checking that its options go together."""
    model = request.model if request.model not in (None, "", "shapes") else None
    given_forms = [
        option for option, value in (("MODEL", model), ("MODEL_FILE", request.model_file), ("EXPORTED", request.exported)) if value
    ]
    if len(given_forms) > 1:
        raise ArchiveError(f"give one of MODEL=, MODEL_FILE=, EXPORTED= (got {' and '.join(given_forms)})")
    if request.class_name and not request.model_file:
        raise ArchiveError("CLASS= names the class inside MODEL_FILE=; give MODEL_FILE= too")
    if request.extra_files and not request.model_file:
        raise ArchiveError("EXTRA_FILES= ships modules that MODEL_FILE= imports; give MODEL_FILE= too")
    if request.exported:
        if request.weights:
            raise ArchiveError("EXPORTED= carries its own weights; leave WEIGHTS= out")
        return "exported"
    if request.model_file:
        if not request.weights:
            raise ArchiveError("MODEL_FILE= needs WEIGHTS=<state dict file> (model.state_dict() saved with torch.save)")
        return "model_file"
    if model:
        if not request.weights:
            kind = "a state dict file" if model.startswith("timm:") else "a state dict file or a torchvision weights name"
            raise ArchiveError(f"MODEL={model} needs WEIGHTS=<{kind}>")
        return "timm" if model.startswith("timm:") else "torchvision"
    if request.weights:
        raise ArchiveError("WEIGHTS= needs a model: MODEL=<torchvision builder | timm:name> or MODEL_FILE=model.py")
    return "shapes"


def model_config(
    architecture: str,
    num_classes: int,
    weights: str,
    input_size: tuple[int, int],
    mean: Triple,
    std: Triple,
    method: str,
    layers: tuple[str, ...],
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model-config.yaml's contents: worker settings and the handler section (labels are set by write_model_dir)."""
    return {
        **WORKER_SETTINGS,
        **(settings or {}),
        "handler": {
            "architecture": architecture,
            "num_classes": num_classes,
            "weights": weights,
            "labels": None,
            "input_size": list(input_size),
            "mean": list(mean),
            "std": list(std),
            "method": method,
            "target_layers": list(layers),
            "topk": ModelSpec.topk,
            "scorecam_max_channels": ModelSpec.scorecam_max_channels,
        },
    }


def write_model_dir(directory: Path, config: dict[str, Any], labels: Path | dict[str, Any] | None) -> None:
    if labels is not None:
        mapping = labels if isinstance(labels, dict) else labels_mapping(labels)
        (directory / "index_to_name.json").write_text(json.dumps(mapping, indent=1) + "\n")
        config["handler"]["labels"] = "index_to_name.json"
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def archive(request: ArchiveRequest, export_path: Path) -> Path:
    """Any form -> a checked `export_path/<name>.mar`."""
    if request.name is not None:
        check_model_name(request.name)
    form = form_of(request)
    if form == "shapes":
        if any((request.labels, request.input_size, request.mean, request.std, request.method, request.layers)):
            raise ArchiveError("the built-in shapes model takes no options; its settings live in models/shapes/model-config.yaml")
        return archive_model_dir(request.name or "shapes", ROOT / "models" / "shapes", export_path)
    if request.labels is not None:
        existing_file("LABELS", request.labels)
    with tempfile.TemporaryDirectory(prefix="camserve-model-") as scratch:
        directory = Path(scratch)
        written = FORM_WRITERS[form](request, directory)
        return checked_archive(
            request.name or written.name, directory, export_path, model_file=written.model_file, extra_files=written.extra_files
        )


def _common(request: ArchiveRequest, input_size: tuple[int, int], mean: Triple, std: Triple) -> dict[str, Any]:
    """model_config's common arguments: the request's options where given, else the form's defaults."""
    from camserve.cam import METHODS

    if request.method is not None and request.method not in METHODS:
        raise ArchiveError(f"METHOD={request.method}: unknown; choose one of {sorted(METHODS)}")
    return {
        "input_size": request.input_size or input_size,
        "mean": request.mean or mean,
        "std": request.std or std,
        "method": request.method or ModelSpec.method,
        "layers": request.layers,
        "settings": request.extra_settings,
    }


class TorchvisionWeights(NamedTuple):
    """A torchvision weights enum's state dict and the preprocessing it was trained with."""

    state: dict[str, Any]
    categories: list[str] | None
    side: int
    mean: Triple
    std: Triple


def _torchvision_weights(builder: str, weights_name: str, side: int) -> TorchvisionWeights:
    """The state dict of a torchvision weights name ("ResNet18_Weights.IMAGENET1K_V1", or a member of the
    builder's enum: "IMAGENET1K_V1", "DEFAULT"), with its categories, crop size and normalisation."""
    from torchvision import models

    try:
        weights_enum = models.get_weight(weights_name) if "." in weights_name else models.get_model_weights(builder)[weights_name]
    except (ValueError, KeyError, AttributeError) as error:
        raise ArchiveError(f"WEIGHTS={weights_name} is neither a file nor a torchvision weights name for {builder}: {error}") from None
    try:
        state = weights_enum.get_state_dict(progress=False)
    except Exception as error:  # noqa: BLE001 - a download: urllib, socket and SSL errors alike mean "no network"
        raise ArchiveError(
            f"could not download {weights_enum} ({type(error).__name__}: {error}); without network access, pass a local "
            f"state-dict file as WEIGHTS"
        ) from None
    preset = weights_enum.transforms()
    return TorchvisionWeights(
        state=state,
        categories=weights_enum.meta.get("categories"),
        side=int(preset.crop_size[0]) if hasattr(preset, "crop_size") else side,
        mean=triple(getattr(preset, "mean", ModelSpec.mean)),
        std=triple(getattr(preset, "std", ModelSpec.std)),
    )


def _torchvision(request: ArchiveRequest, directory: Path) -> FormModelDir:
    import torch
    from torchvision import models

    model, weights = given("MODEL", request.model), given("WEIGHTS", request.weights)
    builder = model.removeprefix("torchvision:")
    if builder not in models.list_models():
        raise ArchiveError(
            f"MODEL={model}: torchvision has no such builder (torchvision.models.list_models()); timm models are MODEL=timm:<name>"
        )
    side = TORCHVISION_SIDES.get(builder, max(ModelSpec.input_size))
    if Path(weights).is_file():
        found = TorchvisionWeights(load_state_dict("WEIGHTS", Path(weights)), None, side, ModelSpec.mean, ModelSpec.std)
    else:
        found = _torchvision_weights(builder, weights, side)
    state = without_auxiliary_heads(found.state)
    num_classes = classes_of(state)
    if num_classes is None:
        raise ArchiveError(f"WEIGHTS={weights} has no classifier weight (no 2-D tensor): not a state dict of {builder}")
    torch.save(state, directory / "weights.pt")
    labels: Path | dict[str, Any] | None = request.labels
    if labels is None:  # the weights' categories where torchvision has them, else the class numbers
        categories = found.categories
        names = categories if categories and len(categories) == num_classes else [str(i) for i in range(num_classes)]
        labels = {str(i): name for i, name in enumerate(names)}
    common = _common(request, (found.side, found.side), found.mean, found.std)
    write_model_dir(directory, model_config(f"torchvision:{builder}", num_classes, "weights.pt", **common), labels)
    return FormModelDir(builder)


def _timm(request: ArchiveRequest, directory: Path) -> FormModelDir:
    import timm
    from timm.models import get_pretrained_cfg

    model = given("MODEL", request.model)
    name = model.removeprefix("timm:")
    if not timm.is_model(name):
        raise ArchiveError(f"MODEL={model}: timm {timm.__version__} has no such model (timm.list_models())")
    weights = existing_file("WEIGHTS", request.weights)
    state = load_state_dict("WEIGHTS", weights)
    labels = labels_mapping(request.labels) if request.labels else None
    # The weights say how many classes; LABELS only where they cannot (a mismatch is reported after the probe).
    num_classes = classes_of(state) or (len(labels) if labels else None)
    if num_classes is None:
        raise ArchiveError(f"WEIGHTS={weights} has no classifier weight (no 2-D tensor); give LABELS= to say how many classes")
    shutil.copy2(weights, directory / "weights.pt")
    cfg = get_pretrained_cfg(name)  # timm's own eval size and normalisation for this model, as defaults
    size = (int(cfg.input_size[1]), int(cfg.input_size[2])) if cfg is not None else ModelSpec.input_size
    mean = triple(cfg.mean) if cfg is not None else ModelSpec.mean
    std = triple(cfg.std) if cfg is not None else ModelSpec.std
    write_model_dir(directory, model_config(f"timm:{name}", num_classes, "weights.pt", **_common(request, size, mean, std)), request.labels)
    return FormModelDir(name)


def _model_file(request: ArchiveRequest, directory: Path) -> FormModelDir:
    model_file = existing_file("MODEL_FILE", request.model_file)
    if model_file.suffix != ".py":
        raise ArchiveError(f"MODEL_FILE={request.model_file} must be a Python file (.py)")
    extra = tuple(Path(p).resolve() for p in request.extra_files)
    for path in extra:
        if not path.exists():
            raise ArchiveError(f"EXTRA_FILES: {path}: no such file or folder")
    weights = existing_file("WEIGHTS", request.weights)
    state = load_state_dict("WEIGHTS", weights)
    class_name, takes_num_classes = model_file_class(model_file, request.class_name, extra)
    labels = labels_mapping(request.labels) if request.labels else None
    num_classes = classes_of(state) or (len(labels) if labels else None)
    if num_classes is None and takes_num_classes:
        raise ArchiveError(f"cannot tell how many classes {class_name}(num_classes=...) should have: give LABELS=")
    shutil.copy2(weights, directory / "weights.pt")
    # A class built without num_classes gets 0 here; the probe's real output count replaces it.
    common = _common(request, ModelSpec.input_size, ModelSpec.mean, ModelSpec.std)
    write_model_dir(directory, model_config(f"{model_file.stem}:{class_name}", num_classes or 0, "weights.pt", **common), request.labels)
    return FormModelDir(model_file.stem, model_file, extra)


def _exported_input_size(request: ArchiveRequest, program: Any) -> tuple[int, int]:
    """The exported program's one image input's static (height, width), or ModelSpec's default where dynamic."""
    signature_inputs = program.graph_signature.user_inputs
    user_inputs = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in signature_inputs]
    if len(user_inputs) != 1:
        raise ArchiveError(f"EXPORTED={request.exported} takes {len(user_inputs)} inputs; a classifier takes one image batch")
    shape: Any = getattr(user_inputs[0].meta.get("val"), "shape", ())
    if len(shape) != 4:
        raise ArchiveError(f"EXPORTED={request.exported} takes a {len(shape)}-D input; a classifier takes (batch, 3, height, width)")
    # The example's height and width, where they were exported static, are the input size by default.
    return (int(shape[2]), int(shape[3])) if all(isinstance(s, int) for s in shape[2:]) else ModelSpec.input_size


def _exported(request: ArchiveRequest, directory: Path) -> FormModelDir:
    import torch

    path = existing_file("EXPORTED", request.exported)
    if is_torchscript(path):
        raise torchscript_error("EXPORTED", path)
    try:
        program = torch.export.load(path)
    except Exception as error:  # noqa: BLE001 - the user's file: whatever torch.export.load raises on a foreign file
        raise ArchiveError(
            f"EXPORTED={request.exported} is not a file written by torch.export.save: {type(error).__name__}: {first_line(error)}"[:400]
        ) from None
    size = _exported_input_size(request, program)
    shutil.copy2(path, directory / "model.pt2")
    labels = labels_mapping(request.labels) if request.labels else None
    # Without LABELS the class count is 0 here; the probe's real output count replaces it.
    common = _common(request, size, ModelSpec.mean, ModelSpec.std)
    write_model_dir(directory, model_config(EXPORTED, len(labels) if labels else 0, "model.pt2", **common), request.labels)
    return FormModelDir(path.stem)


FORM_WRITERS = {"torchvision": _torchvision, "timm": _timm, "model_file": _model_file, "exported": _exported}


def torchvision_model_dir(
    builder: str, weights: str, directory: Path, labels: Path | None = None, method: str = ModelSpec.method, layers: tuple[str, ...] = ()
) -> Path:
    """A model dir (state dict, labels, model-config.yaml) for a torchvision classifier, unchecked: for callers that
    archive it themselves with other settings (camserve_tools/bench/serving_benchmark.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    _torchvision(ArchiveRequest(model=builder, weights=weights, labels=labels, method=method, layers=tuple(layers)), directory)
    return directory


def model_file_model_dir(
    model_file: Path,
    weights: Path,
    directory: Path,
    labels: Path | None = None,
    input_size: tuple[int, int] | None = None,
    mean: Triple | None = None,
    std: Triple | None = None,
) -> Path:
    """A model dir for a model file's class (state dict, labels, model-config.yaml, and the model file, whose class
    the architecture names), unchecked: for callers that archive it themselves with other settings
    (camserve_tools/bench/serving_benchmark.py). The model file is copied in because a worker imports it from
    its model dir; whoever loads the model from this dir in-process puts the dir on sys.path as a worker does."""
    directory.mkdir(parents=True, exist_ok=True)
    request = ArchiveRequest(model_file=model_file, weights=str(weights), labels=labels, input_size=input_size, mean=mean, std=std)
    _model_file(request, directory)
    shutil.copy2(model_file, directory / model_file.name)
    return directory
