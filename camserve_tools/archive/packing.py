"""Packing: a model dir (model-config.yaml, weights, labels) -> a checked, self-contained .mar.

Every archive is checked before it is kept: it is built in a scratch store, unpacked, and probed there
(camserve_tools.archive.checks.probe_archive) as a worker would load it; only then is it moved into the store.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from camserve.model_spec import ModelSpec, SpecError
from camserve_tools.archive.checks import ArchiveError, check_labels, check_model_name, check_preprocessing, probe_archive

ROOT = Path(__file__).resolve().parents[2]
HANDLER = ROOT / "camserve" / "engines" / "torchserve_handler.py"
PACKAGE = ROOT / "camserve"


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


def checked_archive(
    name: str, model_dir: Path, export_path: Path, model_file: Path | None = None, extra_files: tuple[Path, ...] = ()
) -> Path:
    """Build the archive in a scratch store, probe it, fix its class count from the real output, and only then
    move it to `export_path`. A model-config the spec rejects is an ArchiveError too."""
    check_model_name(name)
    config_file = model_dir / "model-config.yaml"
    try:
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
    except SpecError as error:
        raise ArchiveError(str(error)) from None
    return target


def archive_model_dir(name: str, model_dir: Path, export_path: Path) -> Path:
    """A project model dir (model-config.yaml, weights, labels) -> a checked archive; the dir is left as it is."""
    check_model_name(name)
    if not (model_dir / "model-config.yaml").is_file():
        raise ArchiveError(f"{model_dir} has no model-config.yaml")
    with tempfile.TemporaryDirectory(prefix="camserve-model-") as scratch:
        copy = Path(scratch) / "model"
        shutil.copytree(model_dir, copy)
        return checked_archive(name, copy, export_path)


def load_archive(mar: Path) -> tuple[Any, ModelSpec, list[str]]:
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
