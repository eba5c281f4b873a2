"""Build a self-contained TorchServe archive (.mar) around handlers/cam_handler.py.

    make archive                                    # the default shapes model -> model_store/shapes.mar
    python scripts/build_archive.py --name shapes --model-dir models/shapes

The archive carries the handler, the whole `camserve` package it imports, the weights, labels and
model-config.yaml, so TorchServe needs nothing of this repository on its PYTHONPATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from camserve.model_spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handlers" / "cam_handler.py"
PACKAGE = ROOT / "camserve"


def build_archive(name: str, model_dir: Path, export_path: Path, version: str = "1.0") -> Path:
    """Archive the model described by `model_dir/model-config.yaml` as `export_path/<name>.mar`."""
    config_file = model_dir / "model-config.yaml"
    spec = ModelSpec.from_dict(yaml.safe_load(config_file.read_text())["handler"])  # fail here, not in a worker
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as staging_dir:
        staging = Path(staging_dir)
        # A directory given as an extra file is copied *into* the archive root, so stage `camserve/` in one.
        shutil.copytree(PACKAGE, staging / "camserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if spec.labels:
            shutil.copy2(model_dir / spec.labels, staging / spec.labels)
        command = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name", name,
            "--version", version,
            "--handler", str(HANDLER),
            "--serialized-file", str(model_dir / spec.weights),
            "--extra-files", str(staging),
            "--config-file", str(config_file),
            "--export-path", str(export_path),
            "--force",
        ]
        subprocess.run(command, check=True)
    return export_path / f"{name}.mar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="shapes")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "shapes")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    args = parser.parse_args()
    print(build_archive(args.name, args.model_dir, args.export_path))


if __name__ == "__main__":
    main()
