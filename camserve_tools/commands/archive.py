"""`camserve archive ARGS`: build a .mar - the archive builder's command line, also behind scripts/build_archive.py.

Every argument goes to the builder's own parser, so the command takes whatever the builder takes and no second list
of options can drift from it. `--json` (taken out before the builder sees the rest) prints {"archive": path}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from camserve.model_spec import ModelSpec
from camserve_tools.archive.checks import MAX_INPUT_SIDE, MIN_INPUT_SIDE, ArchiveError
from camserve_tools.archive.forms import ArchiveRequest, archive
from camserve_tools.archive.packing import ROOT, archive_model_dir
from camserve_tools.commands.common import EXIT_FAILED, EXIT_OK
from camserve_tools.shared_fields import shared_fields

BUILDER_DOC = """Build a checked, self-contained TorchServe archive (.mar) around camserve/serving/handler.py.

    make archive                                                  # the default shapes model -> model_store/shapes.mar
    make archive MODEL=resnet18 WEIGHTS=resnet18.pth              # a torchvision builder + state dict (or weights name)
    make archive MODEL=timm:resnet50 WEIGHTS=resnet50.pth         # a timm model + state dict
    make archive MODEL_FILE=model.py [CLASS=Net] WEIGHTS=net.pth [EXTRA_FILES=a.py,b.py]   # TorchServe's convention
    make archive EXPORTED=model.pt2                               # a torch.export.save file, no Python source needed
    common: LABELS=labels.json NAME=... INPUT_SIZE=224|H,W MEAN=r,g,b STD=r,g,b METHOD=gradcam LAYER=name[,name]

    python scripts/build_archive.py --name shapes --model-dir models/shapes
    python scripts/build_archive.py --model timm:test_efficientnet --weights w.pth --labels labels.json

The model is built and run (dummy forwards, one map) from the unpacked archive before the archive is kept; a
request that cannot serve ends here with a one-line error and exit status 1 (camserve_tools/archive/: forms.py,
packing.py, checks.py).
"""

HELP = "build a .mar archive (make archive); `camserve archive --help` lists the builder's options"
EPILOG = "exit codes: 0 built; 1 the build failed (the archiver, the weights, the labels); 2 usage error"


def register(subparsers: Any) -> None:
    # Listed for `camserve --help`; camserve_tools.cli hands `archive` calls to run_with before any parsing.
    parser = subparsers.add_parser(
        "archive", help=HELP, description=__doc__, epilog=EPILOG, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=lambda args: run_with([], prog="camserve archive"))


def run_with(argv: list[str], prog: str) -> int:
    """Hand `argv` to the archive builder's main(argv); its SystemExit codes pass through (argparse's 2 included)."""
    as_json = "--json" in argv
    argv = [arg for arg in argv if arg != "--json"]
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__}\n{EPILOG}\n", file=sys.stderr if as_json else sys.stdout)
    printed = io.StringIO()
    try:
        with (
            _stdout_to_stderr() if as_json else contextlib.nullcontext(),
            contextlib.redirect_stdout(printed) if as_json else contextlib.nullcontext(),
        ):
            build_main(argv, prog=prog)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(f"{prog}: failed: {exit_.code}", file=sys.stderr)
            return EXIT_FAILED
        return int(exit_.code or 0)
    except subprocess.CalledProcessError as error:
        print(f"{prog}: failed: the model archiver exited with {error.returncode}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError, KeyError) as error:
        print(f"{prog}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        lines = printed.getvalue().strip().splitlines()
        print(json.dumps({"archive": lines[-1] if lines else None}))
    return EXIT_OK


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 onto 2 for a while: the archiver's subprocess output stays off a JSON stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def floats(option: str, count: int, positive: bool = False):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be {count} comma-separated numbers, got {text!r}") from None
        if len(values) != count or not all(math.isfinite(value) for value in values):
            raise argparse.ArgumentTypeError(f"{option} must be {count} comma-separated finite numbers, got {text!r}")
        if positive and min(values) <= 0:
            raise argparse.ArgumentTypeError(f"{option} values must be above 0 (the input is divided by them), got {text!r}")
        return values

    return parse


def input_size(text: str) -> tuple[int, int]:
    try:
        sides = tuple(int(part) for part in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or not all(MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in sides):
        raise argparse.ArgumentTypeError(
            f"INPUT_SIZE must be one side or H,W (pixels, {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}), got {text[:40]!r}"
        )
    return (sides[0], sides[-1])


def build_main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The archive builder's command line (scripts/build_archive.py, make archive, camserve archive)."""
    parser = argparse.ArgumentParser(prog=prog, description=BUILDER_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="archive name (default: after the model)")
    parser.add_argument("--model-dir", type=Path, help="a project model dir with model-config.yaml (default: models/shapes)")
    parser.add_argument("--model", help="a torchvision builder (resnet18) or timm:<name>")
    parser.add_argument("--torchvision", metavar="BUILDER", help="same as --model BUILDER")
    parser.add_argument("--model-file", type=Path, help="a Python file defining the model class (TorchServe's --model-file)")
    parser.add_argument("--class", dest="class_name", help="the class in --model-file (default: the single nn.Module class it defines)")
    parser.add_argument("--weights", help="a state-dict file (with --torchvision also a torchvision weights name)")
    parser.add_argument("--exported", type=Path, help="a torch.export.save file (.pt2)")
    parser.add_argument("--extra-files", default="", help="comma-separated files or folders the model file imports")
    parser.add_argument("--labels", type=Path, help='index_to_name.json: {"0": name} or {"0": [wnid, name]}')
    parser.add_argument("--input-size", type=input_size, help="one side or H,W")
    parser.add_argument("--mean", type=floats("MEAN", 3))
    parser.add_argument("--std", type=floats("STD", 3, positive=True))
    parser.add_argument("--method", help=f"default CAM method (default {ModelSpec.method})")
    parser.add_argument("--layer", default="", help="comma-separated target layer names (default: found automatically)")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    args = parser.parse_args(argv)
    try:
        if args.model_dir is not None:
            print(archive_model_dir(args.name or args.model_dir.name, args.model_dir, args.export_path))
            return
        if args.torchvision and args.model:
            raise ArchiveError("give --model or --torchvision, not both")
        request = ArchiveRequest(
            **shared_fields(
                args,
                ArchiveRequest,
                model=args.model or args.torchvision,
                extra_files=tuple(Path(p) for p in args.extra_files.split(",") if p),
                layers=tuple(name for name in args.layer.split(",") if name),
            )
        )
        print(archive(request, args.export_path))
    except ArchiveError as error:
        sys.exit(f"make archive: {error}")
