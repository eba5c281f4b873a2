"""Ground-truth boxes as annotation tools export them: COCO JSON, or Pascal VOC XML (one file, or a folder of them).

Everything becomes `AnnotatedImage(path, objects)` with boxes as [x0, y0, x1, y1) in pixels - the handler's own
convention (its `bbox`). COCO's bbox is [x, y, width, height]; VOC's bndbox is 1-based and inclusive, so
[xmin - 1, ymin - 1, xmax, ymax). Labels are matched to the model's classes by name (case, '_' and '-' ignored);
objects of categories the model does not know are dropped and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

Box = tuple[float, float, float, float]


class AnnotationError(ValueError):
    """A boxes file that is not COCO JSON or VOC XML, or that names no image of DATA."""


@dataclass(frozen=True)
class GroundTruth:
    class_index: int
    label: str
    box: Box


@dataclass
class AnnotatedImage:
    path: Path
    objects: list[GroundTruth]

    @property
    def classes(self) -> list[int]:
        """The image's classes, each once, in order of first appearance."""
        return list(dict.fromkeys(obj.class_index for obj in self.objects))

    def boxes_of(self, class_index: int) -> list[Box]:
        return [obj.box for obj in self.objects if obj.class_index == class_index]


@dataclass
class AnnotatedSet:
    images: list[AnnotatedImage]
    unmatched_labels: list[str] = field(default_factory=list)  # categories the model has no class for
    missing_images: list[str] = field(default_factory=list)  # annotated files not found under DATA
    unannotated_images: int = 0  # images without any box of a known class


def normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def read_annotations(boxes: Path, data: Path, labels: list[str]) -> AnnotatedSet:
    """The images of `data` that `boxes` annotates, their objects mapped to the model's `labels` by name."""
    if boxes.is_dir():
        raw = [_voc_file(path) for path in sorted(boxes.rglob("*.xml"))]
        if not raw:
            raise AnnotationError(f"{boxes} holds no VOC .xml files")
    elif boxes.suffix.lower() == ".xml":
        raw = [_voc_file(boxes)]
    elif boxes.suffix.lower() == ".json":
        raw = _coco_file(boxes)
    else:
        raise AnnotationError(f"{boxes}: give COCO JSON (.json), a VOC XML file (.xml) or a folder of VOC XML files")
    return _matched(raw, data, labels)


def _matched(raw: list[tuple[str, list[tuple[str, Box]]]], data: Path, labels: list[str]) -> AnnotatedSet:
    by_name = {normalised(label): index for index, label in enumerate(labels)}
    result = AnnotatedSet(images=[])
    unmatched: dict[str, None] = {}
    for file_name, objects in raw:
        path = _image_path(data, file_name)
        if path is None:
            result.missing_images.append(file_name)
            continue
        known = []
        for label, box in objects:
            index = by_name.get(normalised(label))
            if index is None:
                unmatched[label] = None
            else:
                known.append(GroundTruth(index, labels[index], box))
        if known:
            result.images.append(AnnotatedImage(path, known))
        else:
            result.unannotated_images += 1
    result.unmatched_labels = list(unmatched)
    return result


def _image_path(data: Path, file_name: str) -> Path | None:
    """DATA/file_name, else DATA/<its base name> (tools often write the annotator's own folder into the name)."""
    for candidate in (data / file_name, data / Path(file_name).name):
        if candidate.is_file():
            return candidate
    return None


def _coco_file(path: Path) -> list[tuple[str, list[tuple[str, Box]]]]:
    try:
        coco = json.loads(path.read_text())
        categories = {c["id"]: str(c["name"]) for c in coco["categories"]}
        images = {i["id"]: str(i["file_name"]) for i in coco["images"]}
        objects: dict[int, list[tuple[str, Box]]] = {image_id: [] for image_id in images}
        for annotation in coco.get("annotations", []):
            x, y, width, height = (float(v) for v in annotation["bbox"])
            objects[annotation["image_id"]].append((categories[annotation["category_id"]], (x, y, x + width, y + height)))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AnnotationError(
            f"{path} is not COCO JSON with images, annotations (bbox, category_id) and categories: {type(error).__name__}: {error}"
        ) from None
    return [(images[image_id], found) for image_id, found in objects.items()]


def _voc_file(path: Path) -> tuple[str, list[tuple[str, Box]]]:
    try:
        root = ElementTree.parse(path).getroot()
        file_name = root.findtext("filename") or Path(root.findtext("path") or "").name
        if not file_name:
            raise ValueError("no <filename>")
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((obj.findtext("name", "").strip(), (xmin - 1, ymin - 1, xmax, ymax)))
    except (OSError, ElementTree.ParseError, ValueError, TypeError, AttributeError) as error:
        raise AnnotationError(
            f"{path} is not Pascal VOC XML with filename and object/name, bndbox: {type(error).__name__}: {error}"
        ) from None
    return file_name.strip(), objects
