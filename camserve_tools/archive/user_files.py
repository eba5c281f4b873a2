"""The files a user hands the archive builder, read and checked: state dicts, labels, model files, exported
programs. Each reader raises an ArchiveError that names the option (WEIGHTS=, LABELS=, ...) and what is wrong."""

from __future__ import annotations

import inspect
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from camserve_tools.archive.checks import ArchiveError

Value = TypeVar("Value")
# Module names a model file cannot take: a worker imports these from the archive itself.
RESERVED_MODULE_NAMES = ("camserve", "cam_handler")


def given(option: str, value: Value | None) -> Value:
    """`value`, which the form needs: a missing one is the user's error, named by its option."""
    if value is None or value == "":
        raise ArchiveError(f"{option}= is needed for this model form")
    return value


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, for a one-line ArchiveError."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


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


def existing_file(option: str, value: str | Path | None) -> Path:
    """The absolute path of the file `option` names; a missing option or file is an ArchiveError."""
    if value is None:
        raise ArchiveError(f"{option}= is needed for this model form")
    path = Path(value)
    if not path.is_file():
        raise ArchiveError(f"{option}={value}: no such file")
    return path.resolve()


def load_state_dict(option: str, path: Path) -> dict[str, Any]:
    """A state dict (parameter name -> tensor) from `path`, unwrapping a training checkpoint's "state_dict"."""
    import torch

    if is_torchscript(path):
        raise torchscript_error(option, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the user's file: an unpickling error, a corrupt zip, an OS error alike
        raise ArchiveError(
            f"{option}={path} is not a readable state dict (save model.state_dict(), not the model): "
            f"{(first_line(error) or type(error).__name__)[:200]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's usual wrapping
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArchiveError(f"{option}={path} is not a state dict (a mapping of parameter names to tensors): save model.state_dict()")
    return state


def classes_of(state: dict[str, Any]) -> int | None:
    """The classifier's output count: the last 2-D weight's first dimension (None if there is none)."""
    matrices = [v for v in state.values() if v.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def labels_mapping(path: Path) -> dict[str, Any]:
    """LABELS as {"0": name, ...} (or torchvision's {"0": [wordnet id, name], ...})."""
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArchiveError(f"LABELS={path} is not a JSON file: {error}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, list)) for v in mapping.values()):
        raise ArchiveError(
            f'LABELS={path} must map class indices to names, {{"0": "cat", ...}} or torchvision\'s {{"0": ["n02123045", "tabby"], ...}}'
        )
    return mapping


def import_model_file(model_file: Path, extra_files: tuple[Path, ...]) -> ModuleType:
    """The model file as a module, imported with its own and the extra files' folders on the path; neither the
    path entries nor the module stay behind (the probe imports it again from the unpacked archive alone)."""
    import importlib.util

    module_name = model_file.stem
    if not module_name.isidentifier() or module_name in RESERVED_MODULE_NAMES:
        raise ArchiveError(f"MODEL_FILE={model_file}: its name must be a Python module name other than camserve and cam_handler")
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    if spec is None or spec.loader is None:  # a path Python's import machinery cannot load as source
        raise ArchiveError(f"MODEL_FILE={model_file} cannot be imported as a Python module")
    folders = [str(model_file.parent)] + [str(p if p.is_dir() else p.parent) for p in extra_files]
    sys.path[:0] = folders
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file: any import-time failure is reported as its own
        raise ArchiveError(f"MODEL_FILE={model_file} cannot be imported: {type(error).__name__}: {first_line(error)}") from None
    finally:
        del sys.path[: len(folders)]
        sys.modules.pop(module_name, None)
    return module


def model_file_class(model_file: Path, class_name: str | None, extra_files: tuple[Path, ...]) -> tuple[str, bool]:
    """The class to build from a model file: `class_name`, or the single nn.Module class the file defines
    (TorchServe's rule); and whether its constructor takes num_classes."""
    from torch import nn

    module = import_model_file(model_file, extra_files)
    defined = sorted(
        name
        for name, member in inspect.getmembers(module, inspect.isclass)
        if member.__module__ == module.__name__ and issubclass(member, nn.Module)
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
    except (TypeError, ValueError):  # a signature Python cannot read: built without arguments, as TorchServe does
        takes = False
    return class_name, takes
