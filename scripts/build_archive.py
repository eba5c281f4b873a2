"""Build a self-contained TorchServe archive (.mar) around handlers/cam_handler.py.

    make archive                                    # the default shapes model -> model_store/shapes.mar
    make archive MODEL=resnet18 WEIGHTS=resnet18.pth [LABELS=labels.json] [METHOD=gradcam] [LAYER=layer4] [NAME=...]
    make archive MODEL=resnet50 WEIGHTS=ResNet50_Weights.IMAGENET1K_V2   # torchvision weights: downloads if it can

    python scripts/build_archive.py --name shapes --model-dir models/shapes
    python scripts/build_archive.py --torchvision resnet18 --weights resnet18.pth

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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_model_dir(
    builder: str,
    weights: str,
    directory: Path,
    labels: Path | None = None,
    method: str = "gradcam",
    layers: tuple[str, ...] = (),
) -> Path:
    """Write a model dir (state dict, labels, model-config.yaml) for a torchvision classifier.

    `weights` is a state-dict file, or a torchvision weights name (`ResNet18_Weights.IMAGENET1K_V1`, `DEFAULT`),
    downloaded through torchvision where the network allows; its labels and normalisation come from its metadata.
    """
    import json

    import torch
    from torchvision import models

    from camserve.model_spec import build_architecture

    directory.mkdir(parents=True, exist_ok=True)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    side = 299 if builder == "inception_v3" else 224
    categories: list[str] | None = None
    if Path(weights).is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        try:
            # "ResNet18_Weights.IMAGENET1K_V1", or a member of the builder's enum ("IMAGENET1K_V1", "DEFAULT")
            weights_enum = models.get_weight(weights) if "." in weights else models.get_model_weights(builder)[weights]
        except (ValueError, KeyError, AttributeError) as error:
            sys.exit(f"--weights {weights!r} is neither a file nor a torchvision weights name for {builder}: {error}")
        try:
            state = weights_enum.get_state_dict(progress=False)
        except Exception as error:  # noqa: BLE001 - urllib, socket and SSL errors alike
            sys.exit(f"could not download {weights_enum} ({type(error).__name__}: {error}); without network access, "
                     f"pass a local state-dict file as WEIGHTS")
        categories = weights_enum.meta.get("categories")
        preset = weights_enum.transforms()
        side = int(preset.crop_size[0]) if hasattr(preset, "crop_size") else side
        mean, std = tuple(getattr(preset, "mean", mean)), tuple(getattr(preset, "std", std))
    state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    # The number of classes is the last 2-D weight's first dimension (the classifier's output).
    num_classes = int([v for v in state.values() if v.dim() == 2][-1].shape[0])
    build_architecture(f"torchvision:{builder}", num_classes).load_state_dict(state)  # fail here, not in a worker
    torch.save(state, directory / "weights.pt")
    if labels is not None:
        mapping = json.loads(Path(labels).read_text())
    else:
        names = categories if categories and len(categories) == num_classes else [str(i) for i in range(num_classes)]
        mapping = {str(i): name for i, name in enumerate(names)}
    (directory / "index_to_name.json").write_text(json.dumps(mapping, indent=1) + "\n")
    config = {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 1,
        "maxBatchDelay": 20,
        "responseTimeout": 120,
        "handler": {
            "architecture": f"torchvision:{builder}",
            "num_classes": num_classes,
            "weights": "weights.pt",
            "labels": "index_to_name.json",
            "input_size": [side, side],
            "mean": list(mean),
            "std": list(std),
            "method": method,
            "target_layers": list(layers),
            "topk": 5,
            "scorecam_max_channels": 64,
        },
    }
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The archive builder's command line; `camserve archive ARGS` hands its ARGS (and its name) to it."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="archive name (default: shapes, or the torchvision builder)")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "shapes", help="a project model dir with model-config.yaml")
    parser.add_argument("--torchvision", metavar="BUILDER", help="archive a torchvision classifier instead, e.g. resnet18")
    parser.add_argument("--weights", help="with --torchvision: a state-dict file or a torchvision weights name")
    parser.add_argument("--labels", type=Path, help="with --torchvision: index_to_name.json (default: from the weights' metadata)")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--layer", default="", help="comma-separated target layer names (default: found automatically)")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    args = parser.parse_args(argv)
    if not args.torchvision:
        print(build_archive(args.name or "shapes", args.model_dir, args.export_path))
        return
    if not args.weights:
        sys.exit("--torchvision needs --weights (a state-dict file or a torchvision weights name)")
    layers = tuple(name for name in args.layer.split(",") if name)
    with tempfile.TemporaryDirectory(prefix="camserve-model-") as directory:
        model_dir = torchvision_model_dir(args.torchvision, args.weights, Path(directory), args.labels, args.method, layers)
        print(build_archive(args.name or args.torchvision, model_dir, args.export_path))


if __name__ == "__main__":
    main()
