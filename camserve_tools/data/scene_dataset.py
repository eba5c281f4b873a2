"""A labelled image set from camserve_tools.data.scenes, in the formats annotation tools export: COCO JSON and Pascal VOC XML.

    python -m camserve_tools.data.scene_dataset OUT --count 40 [--first-seed N] [--format png|jpeg]

writes OUT/images/scene_<seed>.png, OUT/coco.json and OUT/voc/scene_<seed>.xml. Every scene knows its object's true
box, so `camserve evaluate` can be tried, tested and documented on it without hand-drawn boxes. Seeds default to
the evaluation range (camserve_tools.data.scenes.EVAL_SEED_START and up), never the training one.

Box conventions, as the formats define them: COCO `bbox` is [x, y, width, height] in pixels from the image's
top-left corner; VOC `bndbox` is 1-based and inclusive (xmin = x0 + 1, xmax = x1 for a box [x0, x1) ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from xml.etree import ElementTree

from camserve_tools.data.scenes import CLASSES, EVAL_SEED_START, Scene, make_scene

DEFAULT_FIRST_SEED = EVAL_SEED_START + 7_000_000  # evaluation range, apart from evaluate_shapes' and the tests'


def write_scene_dataset(out: Path, count: int, first_seed: int = DEFAULT_FIRST_SEED, image_format: str = "png") -> list[Path]:
    """Write `count` scenes with their COCO and VOC annotations under `out`; returns the image paths."""
    images_dir, voc_dir = out / "images", out / "voc"
    images_dir.mkdir(parents=True, exist_ok=True)
    voc_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if image_format == "jpeg" else ".png"
    written, coco_images, coco_annotations = [], [], []
    for number, seed in enumerate(range(first_seed, first_seed + count), start=1):
        scene = make_scene(seed)
        file_name = f"scene_{seed}{suffix}"
        if image_format == "jpeg":
            scene.image.save(images_dir / file_name, quality=92)
        else:
            scene.image.save(images_dir / file_name)
        written.append(images_dir / file_name)
        coco_images.append({"id": number, "file_name": file_name, "width": scene.image.width, "height": scene.image.height})
        coco_annotations.append(coco_annotation(number, number, scene))
        voc_xml(file_name, scene).write(voc_dir / f"scene_{seed}.xml", encoding="utf-8", xml_declaration=False)
    coco = {
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [{"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(CLASSES)],
    }
    (out / "coco.json").write_text(json.dumps(coco, indent=1) + "\n")
    return written


def coco_annotation(annotation_id: int, image_id: int, scene: Scene) -> dict:
    x0, y0, x1, y1 = scene.box
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": scene.label + 1,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": (x1 - x0) * (y1 - y0),
        "iscrowd": 0,
    }


def voc_xml(file_name: str, scene: Scene) -> ElementTree.ElementTree:
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "images"
    ElementTree.SubElement(root, "filename").text = file_name
    size = ElementTree.SubElement(root, "size")
    for key, value in (("width", scene.image.width), ("height", scene.image.height), ("depth", 3)):
        ElementTree.SubElement(size, key).text = str(value)
    obj = ElementTree.SubElement(root, "object")
    ElementTree.SubElement(obj, "name").text = scene.name
    ElementTree.SubElement(obj, "difficult").text = "0"
    box = ElementTree.SubElement(obj, "bndbox")
    x0, y0, x1, y1 = scene.box
    for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
        ElementTree.SubElement(box, key).text = str(value)
    ElementTree.indent(root)
    return ElementTree.ElementTree(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--first-seed", type=int, default=DEFAULT_FIRST_SEED)
    parser.add_argument("--format", choices=("png", "jpeg"), default="png")
    args = parser.parse_args(argv)
    paths = write_scene_dataset(args.out, args.count, args.first_seed, args.format)
    print(f"{len(paths)} scenes in {args.out / 'images'}; boxes in {args.out / 'coco.json'} and {args.out / 'voc'}/")


if __name__ == "__main__":
    main()
