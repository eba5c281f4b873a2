"""How large the default JSON answer is: the maximum over a pool of real photographs and scenes, per model and size.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.answer_size  # shapes and imagenet, 640x480 and 1280x960
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.answer_size --models shapes --sizes 640x480 --each
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.answer_size --heatmap-size original  # the heat map at the image's size

The pool (camserve_tools/data/answer_pool.py): every photograph that scikit-image (`skimage.data`) and scikit-learn
(`china.jpg`, `flower.jpg`) ship and that loads without a download, in colour or grey, plus generated scenes (the
default model's own domain), each resized to the given size and sent as PNG. The answer is the default one (the
model's method, top-k and heat map size), as compact JSON bytes: what every engine sends, from the archive's pipeline
in-process (`model_store/<model>.mar`; tests/test_answer_size.py checks the same pool through TorchServe). The
target: every answer within ANSWER_BUDGET bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from camserve_tools.data.answer_pool import photo_pool

ROOT = Path(__file__).resolve().parents[2]
ANSWER_BUDGET = 8_000  # bytes of any default JSON answer of the pool, at 640x480 and at 1280x960
MODELS = ("shapes", "imagenet")
SIZES = ((640, 480), (1280, 960))


def answer_sizes(pipeline: Any, pool: dict[str, bytes], headers: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes of the answer for each image (the default one, unless `headers` set options), from the archive's
    pipeline in-process: the bytes every engine sends."""
    from camserve.pipeline import Row

    sizes = {}
    for name, body in pool.items():
        ((answer,),) = pipeline.answer([[Row(fields={"body": body}, headers={k.lower(): v for k, v in (headers or {}).items()})]])
        if answer.status != 200:
            raise RuntimeError(f"{name}: HTTP {answer.status}: {answer.body}")
        sizes[name] = len(answer.to_bytes())
    return sizes


def size_list(text: str) -> list[tuple[int, int]]:
    return [(int(width), int(height)) for width, _, height in (entry.partition("x") for entry in text.split(","))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="archives in --model-store (default: %(default)s)")
    parser.add_argument("--sizes", type=size_list, default=list(SIZES), help="WxH,... the pool is resized to (default: 640x480,1280x960)")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--each", action="store_true", help="print every image's answer size")
    parser.add_argument("--heatmap-size", help="X-CAM-Heatmap-Size instead of the default (the target applies to the default)")
    args = parser.parse_args()
    headers = {"X-CAM-Heatmap-Size": args.heatmap_size} if args.heatmap_size else {}

    import torch

    from camserve_tools.local_model import open_model

    torch.set_num_threads(1)
    largest = 0
    print(f"| model | image | images | median bytes | max bytes (image) | photos max | scenes max | ≤ {ANSWER_BUDGET:,} |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with open_model(args.model_store / f"{name}.mar") as model:
            for width, height in args.sizes:
                sizes = answer_sizes(model.pipeline, photo_pool((width, height)), headers)
                if args.each:
                    for image, count in sorted(sizes.items(), key=lambda item: -item[1]):
                        print(f"{name} {width}x{height} {image:>22} {count:>7,} bytes", file=sys.stderr)
                photos = [count for image, count in sizes.items() if not image.startswith("scene")]
                scenes = [count for image, count in sizes.items() if image.startswith("scene")]
                worst = max(sizes, key=lambda image: sizes[image])
                largest = max(largest, sizes[worst])
                print(
                    f"| {name} | {width}×{height} | {len(sizes)} | {statistics.median(sizes.values()):,.0f} | {sizes[worst]:,} ({worst}) "
                    f"| {max(photos):,} | {max(scenes):,} | {'met' if sizes[worst] <= ANSWER_BUDGET else '**missed**'} |"
                )
    which = f"answer with X-CAM-Heatmap-Size: {args.heatmap_size}" if args.heatmap_size else "default answer"
    verdict = "met" if largest <= ANSWER_BUDGET else "missed"
    print(f"\nlargest {which}: {largest:,} bytes; target (for the default answer) ≤ {ANSWER_BUDGET:,}: {verdict}")


if __name__ == "__main__":
    main()
