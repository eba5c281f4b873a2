"""Two real photographs with hand-drawn boxes, for `camserve evaluate` on an ImageNet model: scikit-image's
`skimage.data.chelsea()` (a tabby cat) and `skimage.data.coffee()` (an espresso cup on a saucer).

    python -m camserve_tools.data.photo_dataset OUT      # OUT/images/{chelsea,coffee}.png + OUT/coco.json

ImageNet's classes are fine-grained, so each photo carries every class a person would accept for its object (the
cat is a tabby, a tiger cat or an Egyptian cat; the cup an espresso, a cup or a coffee mug), each with the same box:
top-1 counts when the prediction is any of them, and each class's map is judged against the box: the photo's box
in camserve_tools.data.photos, as [x0, y0, x1, y1) pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from camserve_tools.data.photos import LABELLED

_BOXES = {photo.name: photo.box for photo in LABELLED if photo.box is not None}
# name (a skimage.data loader) -> (classes, hand-drawn box of the object)
PHOTOS = {
    "chelsea": (("tabby", "tiger cat", "Egyptian cat"), _BOXES["chelsea"]),
    "coffee": (("espresso", "cup", "coffee mug"), _BOXES["coffee"]),
}


def write_photo_dataset(out: Path) -> list[Path]:
    """The photos as PNG under OUT/images and their boxes as OUT/coco.json; returns the image paths."""
    from PIL import Image
    from skimage import data

    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = {name: index + 1 for index, name in enumerate(dict.fromkeys(c for classes, _ in PHOTOS.values() for c in classes))}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    paths: list[Path] = []
    for image_id, (name, (classes, box)) in enumerate(PHOTOS.items(), start=1):
        pixels = getattr(data, name)()
        path = out / "images" / f"{name}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
        images.append({"id": image_id, "file_name": path.name, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
        x0, y0, x1, y1 = box
        for label in classes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": i, "name": n} for n, i in categories.items()]}
    (out / "coco.json").write_text(json.dumps(coco, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    paths = write_photo_dataset(args.out)
    print(f"{len(paths)} photos in {args.out / 'images'}; boxes in {args.out / 'coco.json'}")


if __name__ == "__main__":
    main()
