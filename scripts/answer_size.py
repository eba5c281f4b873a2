"""How large the default JSON answer is for a 640x480 photo: the maximum over a pool of real photographs and scenes.

    PYTHONPATH=. .venv/bin/python scripts/answer_size.py            # in-process pipeline, same bytes as served
    PYTHONPATH=. .venv/bin/python scripts/answer_size.py --size 1280x960

The pool: every photograph that scikit-image (`skimage.data`) and scikit-learn (`china.jpg`, `flower.jpg`) ship
and that loads without a download, in colour or grey, plus generated scenes (the default model's own domain),
each resized to the given size and sent as PNG. The answer is the default one (`shapes`, Grad-CAM, top 3), as
compact JSON bytes, exactly what TorchServe sends (tests/test_answer_size.py checks the same pool through it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from camserve_tools.answer_pool import photo_pool

ROOT = Path(__file__).resolve().parent.parent


def answer_sizes(pool: dict[str, bytes]) -> dict[str, int]:
    """Bytes of the default answer for each image, from the pipeline in-process (the bytes every engine sends)."""
    import torch

    from camserve.pipeline import CamPipeline, Row

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        for name in ("model-config.yaml", "index_to_name.json", "shapes_net.pt"):
            shutil.copy2(ROOT / "models" / "shapes" / name, Path(directory) / name)
        pipeline = CamPipeline.from_model_dir(directory)
        sizes = {}
        for name, body in pool.items():
            ((answer,),) = pipeline.answer([[Row(fields={"body": body})]])
            sizes[name] = len(answer.to_bytes())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="640x480", help="width x height the pool is resized to")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    sizes = answer_sizes(photo_pool((width, height)))
    for name, count in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"{name:>22} {count:>7,} bytes")
    photos = [count for name, count in sizes.items() if not name.startswith("scene")]
    scenes = [count for name, count in sizes.items() if name.startswith("scene")]
    print(
        f"\n{width}x{height}: {len(sizes)} images; max {max(sizes.values()):,} bytes ({max(sizes, key=sizes.get)}), median "
        f"{statistics.median(sizes.values()):,.0f};"
        f" photos max {max(photos):,}, scenes max {max(scenes):,}"
    )


if __name__ == "__main__":
    main()
