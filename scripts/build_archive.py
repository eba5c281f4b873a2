"""Build a checked, self-contained TorchServe archive (.mar) around camserve/serving/handler.py.

    make archive                                                  # the default shapes model -> model_store/shapes.mar
    make archive MODEL=resnet18 WEIGHTS=resnet18.pth              # a torchvision builder + state dict (or weights name)
    make archive MODEL=timm:resnet50 WEIGHTS=resnet50.pth         # a timm model + state dict
    make archive MODEL_FILE=model.py [CLASS=Net] WEIGHTS=net.pth [EXTRA_FILES=a.py,b.py]   # TorchServe's convention
    make archive EXPORTED=model.pt2                               # a torch.export.save file, no Python source needed
    common: LABELS=labels.json NAME=... INPUT_SIZE=224|H,W MEAN=r,g,b STD=r,g,b METHOD=gradcam LAYER=name[,name]

    python scripts/build_archive.py --name shapes --model-dir models/shapes
    python scripts/build_archive.py --model timm:test_efficientnet --weights w.pth --labels labels.json

The model is built and run (dummy forwards, one map) from the unpacked archive before the archive is kept; a
request that cannot serve ends here with a one-line error and exit status 1 (camserve_tools/archive.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from camserve_tools.archive import ArchiveError, ArchiveRequest, archive, archive_model_dir

ROOT = Path(__file__).resolve().parent.parent


def floats(option: str, count: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be {count} comma-separated numbers, got {text!r}") from None
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"{option} must be {count} comma-separated numbers, got {text!r}")
        return values

    return parse


def input_size(text: str) -> tuple[int, int]:
    try:
        sides = tuple(int(part) for part in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 8:
        raise argparse.ArgumentTypeError(f"INPUT_SIZE must be one side or H,W (pixels, at least 8), got {text!r}")
    return (sides[0], sides[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="archive name (default: after the model)")
    parser.add_argument("--model-dir", type=Path, help="a project model dir with model-config.yaml (default: models/shapes)")
    parser.add_argument("--model", help="a torchvision builder (resnet18) or timm:<name>")
    parser.add_argument("--torchvision", metavar="BUILDER", help="same as --model BUILDER")
    parser.add_argument("--model-file", type=Path, help="a Python file defining the model class (TorchServe's --model-file)")
    parser.add_argument("--class", dest="class_name", help="the class in --model-file (default: the single nn.Module class it defines)")
    parser.add_argument("--weights", help="a state-dict file (with --torchvision also a torchvision weights name)")
    parser.add_argument("--exported", type=Path, help="a torch.export.save file (.pt2)")
    parser.add_argument("--extra-files", default="", help="comma-separated files or folders the model file imports")
    parser.add_argument("--labels", type=Path, help="index_to_name.json: {\"0\": name} or {\"0\": [wnid, name]}")
    parser.add_argument("--input-size", type=input_size, help="one side or H,W")
    parser.add_argument("--mean", type=floats("MEAN", 3))
    parser.add_argument("--std", type=floats("STD", 3))
    parser.add_argument("--method", help="default CAM method (default gradcam)")
    parser.add_argument("--layer", default="", help="comma-separated target layer names (default: found automatically)")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    args = parser.parse_args()
    try:
        if args.model_dir is not None:
            print(archive_model_dir(args.name or args.model_dir.name, args.model_dir, args.export_path))
            return
        if args.torchvision and args.model:
            raise ArchiveError("give --model or --torchvision, not both")
        request = ArchiveRequest(
            model=args.model or args.torchvision,
            model_file=args.model_file,
            class_name=args.class_name,
            weights=args.weights,
            exported=args.exported,
            extra_files=tuple(Path(p) for p in args.extra_files.split(",") if p),
            labels=args.labels,
            name=args.name,
            input_size=args.input_size,
            mean=args.mean,
            std=args.std,
            method=args.method,
            layers=tuple(name for name in args.layer.split(",") if name),
        )
        print(archive(request, args.export_path))
    except ArchiveError as error:
        sys.exit(f"make archive: {error}")


if __name__ == "__main__":
    main()
