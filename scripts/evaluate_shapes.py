"""Measure the default `shapes` model on freshly generated scenes (never training seeds).

    make evaluate                       # 1,000 scenes, gradcam and cam; prints a Markdown table
    python scripts/evaluate_shapes.py --scenes 300 --methods gradcam
    python scripts/evaluate_shapes.py --generator other_scenes.py   # scenes from another file's make_scene(seed)
    python scripts/evaluate_shapes.py --input-sizes 160,176,192,208 --validation   # the size to serve at

Figures and how they are measured: camserve_tools/quality/shapes_quality.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from camserve_tools.data.scenes import EVAL_SEED_START, VALIDATION_SEED_START, make_scene
from camserve_tools.quality.shapes_quality import MODEL_DIR, evaluate, load_generator


def square_sizes(text: str) -> list[int]:
    try:
        sizes = [int(side) for side in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(not 8 <= side <= 1024 for side in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated sides of 8-1024 px, got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--methods", default="gradcam,cam")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--first-seed", type=int, default=EVAL_SEED_START)
    parser.add_argument("--validation", action="store_true", help="scenes from VALIDATION_SEED_START (for choosing a setting)")
    parser.add_argument("--generator", type=Path, help="a Python file whose make_scene(seed) replaces camserve_tools.data.scenes'")
    parser.add_argument(
        "--input-sizes", type=square_sizes, help="comma-separated square sizes to serve the model at instead of its config's (one row each)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args()
    first_seed = VALIDATION_SEED_START if args.validation else args.first_seed
    try:
        scene_maker = load_generator(args.generator) if args.generator else make_scene
    except ValueError as error:
        parser.error(str(error))
    sizes: list[int | None] = list(args.input_sizes) if args.input_sizes else [None]
    results = {
        f"{method} at {size} px" if size else method: evaluate(
            args.model_dir, method, args.scenes, first_seed, scene_maker=scene_maker, input_size=(size, size) if size else None
        )
        for method in args.methods.split(",")
        for size in sizes
    }
    if args.json:
        print(json.dumps({m: q.__dict__ for m, q in results.items()}, indent=2))
        return
    print("| method | scenes | top-1 | pointing game | box IoU >= 0.5 | mean box IoU |\n|---|---|---|---|---|---|")
    for method, q in results.items():
        print(f"| {method} | {q.scenes} | {q.top1:.1%} | {q.pointing:.1%} | {q.iou_050:.1%} | {q.mean_iou:.3f} |")


if __name__ == "__main__":
    main()
