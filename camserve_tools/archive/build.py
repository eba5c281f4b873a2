"""Archive time: every form a classifier arrives in -> a model dir -> a checked, self-contained .mar.

Forms (`make archive` variables in brackets):
- a torchvision builder and a state dict or torchvision weights name   [MODEL=resnet18 WEIGHTS=...]
- timm, by name, and a state dict                                      [MODEL=timm:<name> WEIGHTS=...]
- TorchServe's convention: a model file and a state dict               [MODEL_FILE=model.py [CLASS=Name] WEIGHTS=... [EXTRA_FILES=...]]
- a torch.export program                                               [EXPORTED=model.pt2]
Common: LABELS, NAME, INPUT_SIZE, MEAN, STD, METHOD, LAYER.

Every archive is checked before it is kept: it is built, unpacked, and `camserve_tools/archive/probe.py` builds the model
from the unpacked files alone (as a worker would), runs dummy forwards and a map. Anything wrong is an
`ArchiveError` whose one-line message names the problem, and no archive is written.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from camserve.model_spec import EXPORTED, ModelSpec, SpecError, without_auxiliary_heads

ROOT = Path(__file__).resolve().parents[2]
HANDLER = ROOT / "camserve" / "engines" / "torchserve_handler.py"
PACKAGE = ROOT / "camserve"
PROBE = Path(__file__).resolve().with_name("probe.py")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TorchServe worker settings of a generated model-config.yaml (the benchmark overrides them per run).
WORKER_SETTINGS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 20, "responseTimeout": 120}
# A model name as TorchServe's management API accepts one; it is also the archive's file name, so it can name
# neither a folder nor anything a shell or a URL would read specially.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_MODEL_NAME_LENGTH = 128
# The model's input, per side: below this a convolutional network has nothing left to map, above it one dummy
# forward pass alone needs gigabytes.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 8, 4096


class ArchiveError(ValueError):
    """What is wrong with an archive request, in one line: the archive is not written."""


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
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    method: str | None = None
    layers: tuple[str, ...] = ()
    extra_settings: dict = field(default_factory=dict)


# -- checks ---------------------------------------------------------------------------------------------------


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a served model's name (and its archive's file name), or None when it can."""
    if len(name) > MAX_MODEL_NAME_LENGTH:
        return f"model name {name[:40]!r}... is {len(name)} characters long, over {MAX_MODEL_NAME_LENGTH}"
    if not MODEL_NAME_PATTERN.fullmatch(name):
        return f"model name {name!r} must be letters, digits, '_', '.' and '-', starting with a letter or digit"
    return None


def check_preprocessing(spec: ModelSpec) -> None:
    """Normalisation and input size that every request can go through: finite MEAN and STD, STD above zero (a zero
    or non-finite value makes every input tensor inf or nan), and sides within [MIN_INPUT_SIDE, MAX_INPUT_SIDE]."""
    height, width = spec.input_size
    if not all(isinstance(side, int) and MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in (height, width)):
        raise ArchiveError(
            f"INPUT_SIZE {height},{width}: each side must be a whole number of pixels from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}"
        )
    for option, values in (("MEAN", spec.mean), ("STD", spec.std)):
        if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ArchiveError(f"{option}={','.join(map(str, values))}: must be three finite numbers (r,g,b)")
    if min(spec.std) <= 0:
        raise ArchiveError(f"STD={','.join(map(str, spec.std))}: every value must be above 0 (the input is divided by it)")


# -- packing --------------------------------------------------------------------------------------------------


def build_archive(
    name: str, model_dir: Path, export_path: Path, version: str = "1.0", model_file: Path | None = None, extra_files: tuple[Path, ...] = ()
) -> Path:
    """Archive the model described by `model_dir/model-config.yaml` as `export_path/<name>.mar` (unchecked).

    The archive carries the handler, the whole `camserve` package it imports, the weights, labels and
    model-config.yaml, and for a model file that file and `extra_files` (TorchServe's --model-file and
    --extra-files: a directory's contents land in the archive root), so a worker needs nothing of this repository.
    """
    config_file = model_dir / "model-config.yaml"
    spec = ModelSpec.from_model_dir(model_dir)  # fail here, not in a worker
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as staging_dir:
        staging = Path(staging_dir)
        # A directory given as an extra file is copied *into* the archive root, so stage `camserve/` in one.
        shutil.copytree(PACKAGE, staging / "camserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if spec.labels:
            shutil.copy2(model_dir / spec.labels, staging / spec.labels)
        command = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name",
            name,
            "--version",
            version,
            "--handler",
            str(HANDLER),
            "--serialized-file",
            str(model_dir / spec.weights),
            "--extra-files",
            ",".join([str(staging), *(str(path) for path in extra_files)]),
            "--config-file",
            str(config_file),
            "--export-path",
            str(export_path),
            "--force",
        ]
        if model_file is not None:
            command += ["--model-file", str(model_file)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return export_path / f"{name}.mar"


def probe_archive(mar: Path) -> dict:
    """Unpack `mar` and build, run and map its model there as a worker would (camserve_tools/archive/probe.py)."""
    with tempfile.TemporaryDirectory(prefix="camserve-probe-") as unpacked:
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(unpacked)
        # PYTHONPATH empty and cwd in the unpacked archive: what TorchServe gives a worker (plus its model dir).
        environment = {**os.environ, "PYTHONPATH": "", "TMPDIR": unpacked}
        completed = subprocess.run(
            [sys.executable, str(PROBE), unpacked], cwd=unpacked, env=environment, capture_output=True, text=True, timeout=600
        )
    lines = completed.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " ".join(completed.stderr.strip().splitlines()[-3:])
        return {"error": f"the model check crashed (exit {completed.returncode}): {tail[:400]}"}


def checked_archive(
    name: str, model_dir: Path, export_path: Path, model_file: Path | None = None, extra_files: tuple[Path, ...] = ()
) -> Path:
    """Build the archive in a scratch store, probe it, fix its class count from the real output, and only then
    move it to `export_path`."""
    config_file = model_dir / "model-config.yaml"
    if (problem := model_name_problem(name)) is not None:
        raise ArchiveError(f"NAME: {problem}")
    check_preprocessing(ModelSpec.from_model_dir(model_dir))
    with tempfile.TemporaryDirectory(prefix="camserve-store-") as scratch:
        mar = build_archive(name, model_dir, Path(scratch), model_file=model_file, extra_files=extra_files)
        result = probe_archive(mar)
        if "error" in result:
            raise ArchiveError(result["error"])
        config = yaml.safe_load(config_file.read_text())
        check_labels(model_dir, config["handler"].get("labels"), result["num_classes"])
        if config["handler"]["num_classes"] != result["num_classes"]:
            # Only the count changes (a class built without num_classes, an exported program): archive it again.
            config["handler"]["num_classes"] = result["num_classes"]
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            mar = build_archive(name, model_dir, Path(scratch), model_file=model_file, extra_files=extra_files)
        export_path.mkdir(parents=True, exist_ok=True)
        target = export_path / mar.name
        shutil.move(str(mar), target)
    return target


def archive_model_dir(name: str, model_dir: Path, export_path: Path) -> Path:
    """A project model dir (model-config.yaml, weights, labels) -> a checked archive; the dir is left as it is."""
    if (problem := model_name_problem(name)) is not None:
        raise ArchiveError(f"NAME: {problem}")
    if not (model_dir / "model-config.yaml").is_file():
        raise ArchiveError(f"{model_dir} has no model-config.yaml")
    with tempfile.TemporaryDirectory(prefix="camserve-model-") as scratch:
        copy = Path(scratch) / "model"
        shutil.copytree(model_dir, copy)
        try:
            return checked_archive(name, copy, export_path)
        except SpecError as error:
            raise ArchiveError(str(error)) from None


def check_labels(model_dir: Path, labels: str | None, num_classes: int) -> None:
    if not labels:
        return
    mapping = json.loads((model_dir / labels).read_text())
    wanted = {str(i) for i in range(num_classes)}
    if set(mapping) != wanted:
        raise ArchiveError(
            f"LABELS has {len(mapping)} entries (keys {_key_range(mapping)}), the model outputs {num_classes} classes (keys "
            f"0..{num_classes - 1})"
        )


def _key_range(mapping: dict) -> str:
    keys = sorted(mapping, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    return f"{keys[0]}..{keys[-1]}" if keys else "none"


# -- inputs ---------------------------------------------------------------------------------------------------


def is_torchscript(path: Path) -> bool:
    """torch.jit.save writes a zip with the module's code and constants; state dicts and torch.export files have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/__torch__/" in name for name in archive.namelist())


def torchscript_error(option: str, path: Path) -> ArchiveError:
    return ArchiveError(
        f"{option}={path} is a TorchScript file: TorchScript modules take no forward hooks, so no class activation map "
        f"can be read from them. Export the model with torch.export instead (torch.export.export(model, (example,), "
        f"dynamic_shapes={{'x': {{0: torch.export.Dim('batch')}}}}) then torch.export.save(program, 'model.pt2')) and "
        f"pass EXPORTED=model.pt2"
    )


def existing_file(option: str, value: str | Path) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ArchiveError(f"{option}={value}: no such file")
    return path.resolve()


def load_state_dict(option: str, path: Path) -> dict:
    import torch

    if is_torchscript(path):
        raise torchscript_error(option, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling error, a corrupt file...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArchiveError(
            f"{option}={path} is not a readable state dict (save model.state_dict(), not the model): {first[:200]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's usual wrapping
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArchiveError(f"{option}={path} is not a state dict (a mapping of parameter names to tensors): save model.state_dict()")
    return state


def classes_of(state: dict) -> int | None:
    """The classifier's output count: the last 2-D weight's first dimension (None if there is none)."""
    matrices = [v for v in state.values() if v.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def labels_mapping(path: Path) -> dict:
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArchiveError(f"LABELS={path} is not a JSON file: {error}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, list)) for v in mapping.values()):
        raise ArchiveError(
            f'LABELS={path} must map class indices to names, {{"0": "cat", ...}} or torchvision\'s {{"0": ["n02123045", "tabby"], ...}}'
        )
    return mapping


def model_file_class(model_file: Path, class_name: str | None, extra_files: tuple[Path, ...]) -> tuple[str, bool]:
    """The class to build from a model file: `class_name`, or the single nn.Module class the file defines
    (TorchServe's rule); and whether its constructor takes num_classes. Imported here with the file's and the
    extra files' folders on the path (the probe imports it again from the unpacked archive alone)."""
    import importlib
    import importlib.util

    from torch import nn

    module_name = model_file.stem
    if not module_name.isidentifier() or module_name in ("camserve", "cam_handler"):
        raise ArchiveError(f"MODEL_FILE={model_file}: its name must be a Python module name other than camserve and cam_handler")
    folders = [str(model_file.parent)] + [str(p if p.is_dir() else p.parent) for p in extra_files]
    sys.path[:0] = folders
    try:
        spec = importlib.util.spec_from_file_location(module_name, model_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file: any import-time failure
        raise ArchiveError(
            f"MODEL_FILE={model_file} cannot be imported: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    finally:
        del sys.path[: len(folders)]
        sys.modules.pop(module_name, None)
    defined = sorted(
        name
        for name, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module_name and issubclass(member, nn.Module)
    )
    if class_name:
        member = getattr(module, class_name, None)
        if not (inspect.isclass(member) and issubclass(member, nn.Module)):
            raise ArchiveError(f"MODEL_FILE={model_file} has no nn.Module class {class_name!r} (it defines {defined or 'none'})")
    elif len(defined) != 1:
        raise ArchiveError(f"MODEL_FILE={model_file} defines {len(defined)} nn.Module classes {defined}: name the model with CLASS=")
    else:
        class_name = defined[0]
    try:
        takes = "num_classes" in inspect.signature(getattr(module, class_name)).parameters
    except (TypeError, ValueError):
        takes = False
    return class_name, takes


# -- forms ----------------------------------------------------------------------------------------------------


def form_of(request: ArchiveRequest) -> str:
    """Which form the request is, after checking that its options go together."""
    model = request.model if request.model not in (None, "", "shapes") else None
    given = [option for option, value in (("MODEL", model), ("MODEL_FILE", request.model_file), ("EXPORTED", request.exported)) if value]
    if len(given) > 1:
        raise ArchiveError(f"give one of MODEL=, MODEL_FILE=, EXPORTED= (got {' and '.join(given)})")
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
    labels: str | None,
    input_size: tuple[int, int],
    mean,
    std,
    method: str,
    layers: tuple[str, ...],
    settings: dict | None = None,
) -> dict:
    return {
        **WORKER_SETTINGS,
        **(settings or {}),
        "handler": {
            "architecture": architecture,
            "num_classes": num_classes,
            "weights": weights,
            "labels": labels,
            "input_size": list(input_size),
            "mean": list(mean),
            "std": list(std),
            "method": method,
            "target_layers": list(layers),
            "topk": 5,
            "scorecam_max_channels": 64,
        },
    }


def write_model_dir(directory: Path, config: dict, labels: Path | dict | None) -> None:
    if labels is not None:
        mapping = labels if isinstance(labels, dict) else labels_mapping(labels)
        (directory / "index_to_name.json").write_text(json.dumps(mapping, indent=1) + "\n")
        config["handler"]["labels"] = "index_to_name.json"
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def archive(request: ArchiveRequest, export_path: Path) -> Path:
    """Any form -> a checked `export_path/<name>.mar`."""
    if request.name is not None and (problem := model_name_problem(request.name)) is not None:
        raise ArchiveError(f"NAME: {problem}")
    form = form_of(request)
    if form == "shapes":
        if any((request.labels, request.input_size, request.mean, request.std, request.method, request.layers)):
            raise ArchiveError("the built-in shapes model takes no options; its settings live in models/shapes/model-config.yaml")
        return archive_model_dir(request.name or "shapes", ROOT / "models" / "shapes", export_path)
    if request.labels is not None:
        existing_file("LABELS", request.labels)
    with tempfile.TemporaryDirectory(prefix="camserve-model-") as scratch:
        directory = Path(scratch)
        if form == "torchvision":
            name, model_file, extra = _torchvision(request, directory), None, ()
        elif form == "timm":
            name, model_file, extra = _timm(request, directory), None, ()
        elif form == "model_file":
            name, model_file, extra = _model_file(request, directory)
        else:
            name, model_file, extra = _exported(request, directory), None, ()
        try:
            return checked_archive(request.name or name, directory, export_path, model_file=model_file, extra_files=extra)
        except SpecError as error:
            raise ArchiveError(str(error)) from None


def _common(request: ArchiveRequest, input_size, mean, std) -> dict:
    from camserve.cam import METHODS

    if request.method is not None and request.method not in METHODS:
        raise ArchiveError(f"METHOD={request.method}: unknown; choose one of {sorted(METHODS)}")
    return {
        "input_size": request.input_size or input_size,
        "mean": request.mean or mean,
        "std": request.std or std,
        "method": request.method or "gradcam",
        "layers": request.layers,
        "settings": request.extra_settings,
    }


def _torchvision(request: ArchiveRequest, directory: Path) -> str:
    import torch
    from torchvision import models

    builder = request.model.removeprefix("torchvision:")
    if builder not in models.list_models():
        raise ArchiveError(
            f"MODEL={request.model}: torchvision has no such builder (torchvision.models.list_models()); timm models are MODEL=timm:<name>"
        )
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    side = 299 if builder == "inception_v3" else 224
    categories: list[str] | None = None
    if Path(request.weights).is_file():
        state = load_state_dict("WEIGHTS", Path(request.weights))
    else:
        try:
            # "ResNet18_Weights.IMAGENET1K_V1", or a member of the builder's enum ("IMAGENET1K_V1", "DEFAULT")
            weights_enum = (
                models.get_weight(request.weights) if "." in request.weights else models.get_model_weights(builder)[request.weights]
            )
        except (ValueError, KeyError, AttributeError) as error:
            raise ArchiveError(
                f"WEIGHTS={request.weights} is neither a file nor a torchvision weights name for {builder}: {error}"
            ) from None
        try:
            state = weights_enum.get_state_dict(progress=False)
        except Exception as error:  # noqa: BLE001 - urllib, socket and SSL errors alike
            raise ArchiveError(
                f"could not download {weights_enum} ({type(error).__name__}: {error}); without network access, pass a local "
                f"state-dict file as WEIGHTS"
            ) from None
        categories = weights_enum.meta.get("categories")
        preset = weights_enum.transforms()
        side = int(preset.crop_size[0]) if hasattr(preset, "crop_size") else side
        mean, std = tuple(getattr(preset, "mean", mean)), tuple(getattr(preset, "std", std))
    state = without_auxiliary_heads(state)
    num_classes = classes_of(state)
    if num_classes is None:
        raise ArchiveError(f"WEIGHTS={request.weights} has no classifier weight (no 2-D tensor): not a state dict of {builder}")
    torch.save(state, directory / "weights.pt")
    labels: Path | dict | None = request.labels
    if labels is None:  # the weights' categories where torchvision has them, else the class numbers
        names = categories if categories and len(categories) == num_classes else [str(i) for i in range(num_classes)]
        labels = {str(i): name for i, name in enumerate(names)}
    config = model_config(f"torchvision:{builder}", num_classes, "weights.pt", None, **_common(request, (side, side), mean, std))
    write_model_dir(directory, config, labels)
    return builder


def _timm(request: ArchiveRequest, directory: Path) -> str:
    import timm
    from timm.models import get_pretrained_cfg

    name = request.model.removeprefix("timm:")
    if not timm.is_model(name):
        raise ArchiveError(f"MODEL={request.model}: timm {timm.__version__} has no such model (timm.list_models())")
    weights = existing_file("WEIGHTS", request.weights)
    state = load_state_dict("WEIGHTS", weights)
    labels = labels_mapping(request.labels) if request.labels else None
    # The weights say how many classes; LABELS only where they cannot (a mismatch is reported after the probe).
    num_classes = classes_of(state) or (len(labels) if labels else None)
    if num_classes is None:
        raise ArchiveError(f"WEIGHTS={weights} has no classifier weight (no 2-D tensor); give LABELS= to say how many classes")
    shutil.copy2(weights, directory / "weights.pt")
    cfg = get_pretrained_cfg(name)  # timm's own eval size and normalisation for this model, as defaults
    size = tuple(cfg.input_size[1:]) if cfg is not None else (224, 224)
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    config = model_config(f"timm:{name}", num_classes, "weights.pt", None, **_common(request, size, mean, std))
    write_model_dir(directory, config, request.labels)
    return name


def _model_file(request: ArchiveRequest, directory: Path) -> tuple[str, Path, tuple[Path, ...]]:
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
    config = model_config(
        f"{model_file.stem}:{class_name}", num_classes or 0, "weights.pt", None, **_common(request, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    )
    write_model_dir(directory, config, request.labels)
    return model_file.stem, model_file, extra


def _exported(request: ArchiveRequest, directory: Path) -> str:
    import torch

    path = existing_file("EXPORTED", request.exported)
    if is_torchscript(path):
        raise torchscript_error("EXPORTED", path)
    try:
        program = torch.export.load(path)
    except Exception as error:  # noqa: BLE001
        raise ArchiveError(
            f"EXPORTED={request.exported} is not a file written by torch.export.save: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"[:400]
        ) from None
    user_inputs = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    if len(user_inputs) != 1:
        raise ArchiveError(f"EXPORTED={request.exported} takes {len(user_inputs)} inputs; a classifier takes one image batch")
    shape = getattr(user_inputs[0].meta.get("val"), "shape", ())
    if len(shape) != 4:
        raise ArchiveError(f"EXPORTED={request.exported} takes a {len(shape)}-D input; a classifier takes (batch, 3, height, width)")
    # The example's height and width, where they were exported static, are the input size by default.
    size = tuple(int(s) for s in shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else (224, 224)
    shutil.copy2(path, directory / "model.pt2")
    labels = labels_mapping(request.labels) if request.labels else None
    config = model_config(EXPORTED, len(labels) if labels else 0, "model.pt2", None, **_common(request, size, IMAGENET_MEAN, IMAGENET_STD))
    write_model_dir(directory, config, request.labels)
    return path.stem


def load_archive(mar: Path) -> tuple:
    """(model, spec, labels) of a built archive, loaded from its own files as a worker loads them: for scripts
    (figures, benchmarks) that should see exactly what is served. The archive's model file, if any, is imported."""
    from camserve.model_spec import load_labels, load_model

    with tempfile.TemporaryDirectory(prefix="camserve-unpacked-") as unpacked:
        with zipfile.ZipFile(mar) as archive_file:
            archive_file.extractall(unpacked)
        root = Path(unpacked)
        spec = ModelSpec.from_model_dir(root)
        sys.path.insert(0, unpacked)
        try:
            model = load_model(spec, root)
        finally:
            sys.path.remove(unpacked)
        return model, spec, load_labels(spec, root)


def torchvision_model_dir(
    builder: str, weights: str, directory: Path, labels: Path | None = None, method: str = "gradcam", layers: tuple[str, ...] = ()
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
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
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
