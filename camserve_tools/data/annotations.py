"""Ground-truth boxes as annotation tools export them: COCO JSON, or Pascal VOC XML (one file, or a folder of them).

Everything becomes `AnnotatedImage(path, objects)` with boxes as [x0, y0, x1, y1) in pixels - the handler's own
convention (its `bbox`). COCO's bbox is [x, y, width, height]; VOC's bndbox is 1-based and inclusive, so
[xmin - 1, ymin - 1, xmax, ymax). Labels are matched to the model's classes by name (case, '_' and '-' ignored);
objects of categories the model does not know are dropped and reported.

Annotation files come from elsewhere, so nothing in them is trusted. A file that cannot be read as COCO or VOC at
all is an AnnotationError (a usage error). Within a readable file, each entry that cannot be used - a box of no
area or not four finite numbers, an unknown image or category, an image name that is absolute or climbs out of
DATA - is dropped and recorded as a `DataError` naming where it is and what is wrong, and the rest is evaluated.
Image files are looked up only inside DATA.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree import ElementTree

from camserve_tools.bounded_files import FileRefused, is_regular_file, read_bounded

Box = tuple[float, float, float, float]
# A COCO file of a large public set (COCO 2017 train, instances) is under 500 MB; one VOC file is a few KB.
MAX_COCO_BYTES = 1024 * 1024 * 1024
MAX_VOC_BYTES = 16 * 1024 * 1024


class AnnotationError(ValueError):
    """A boxes file that cannot be read as COCO JSON or VOC XML at all."""


class UnusableEntry(ValueError):
    """One entry of a readable boxes file that cannot be used; the message says why."""


@dataclass(frozen=True)
class DataError:
    """One annotation entry that was dropped: where it is (file and entry) and what is wrong with it."""

    where: str
    problem: str


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
    data_errors: list[DataError] = field(default_factory=list)  # entries dropped, each named


@dataclass
class RawImage:
    """One annotated image as the file states it: its file name and its (label, box) objects."""

    file_name: str
    where: str
    objects: list[tuple[str, Box]]


def normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def read_annotations(boxes: Path, data: Path, labels: list[str]) -> AnnotatedSet:
    """The images of `data` that `boxes` annotates, their objects mapped to the model's `labels` by name."""
    errors: list[DataError] = []
    if boxes.is_dir():
        files = sorted(path for path in boxes.rglob("*.xml") if is_regular_file(path))
        if not files:
            raise AnnotationError(f"{boxes} holds no VOC .xml files")
        raw = [image for path in files if (image := _voc_file(path, errors)) is not None]
    elif boxes.suffix.lower() == ".xml":
        raw = [image] if (image := _voc_file(boxes, errors)) is not None else []
    elif boxes.suffix.lower() == ".json":
        raw = _coco_file(boxes, errors)
    else:
        raise AnnotationError(f"{boxes}: give COCO JSON (.json), a VOC XML file (.xml) or a folder of VOC XML files")
    result = _matched(raw, data, labels, errors)
    result.data_errors = errors
    return result


def _matched(raw: list[RawImage], data: Path, labels: list[str], errors: list[DataError]) -> AnnotatedSet:
    by_name = {normalised(label): index for index, label in enumerate(labels)}
    result = AnnotatedSet(images=[])
    unmatched: dict[str, None] = {}
    for image in raw:
        if (problem := unsafe_file_name(image.file_name)) is not None:
            errors.append(DataError(image.where, problem))
            continue
        path = _image_path(data, image.file_name)
        if path is None:
            result.missing_images.append(image.file_name)
            continue
        known = []
        for label, box in image.objects:
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


def unsafe_file_name(file_name: str) -> str | None:
    """Why an annotated image name is not read (it would name a file outside DATA), or None for a name inside it."""
    if not file_name:
        return "the image file name is empty"
    if "\x00" in file_name:
        return f"the image file name {file_name!r} holds a NUL byte"
    path = PurePosixPath(file_name)
    if path.is_absolute():
        return f"the image file name {file_name!r} is absolute: images are read only inside DATA"
    if ".." in path.parts:
        return f"the image file name {file_name!r} climbs out of DATA ('..'): images are read only inside DATA"
    return None


def _image_path(data: Path, file_name: str) -> Path | None:
    """DATA/file_name, else DATA/<its base name> (tools often write the annotator's own folder into the name);
    regular files only. The name has passed unsafe_file_name, so both candidates lie inside DATA."""
    for candidate in (data / file_name, data / PurePosixPath(file_name).name):
        if is_regular_file(candidate):
            return candidate
    return None


def checked_box(x0: Any, y0: Any, x1: Any, y1: Any) -> Box:
    """[x0, y0, x1, y1) as floats; ValueError naming what is wrong when it is not a box with an area."""
    box = tuple(float(v) for v in (x0, y0, x1, y1))
    if not all(math.isfinite(v) for v in box):
        raise UnusableEntry(f"box {list(box)} is not four finite numbers")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise UnusableEntry(f"box [x0, y0, x1, y1) = {list(box)} has no area (width {box[2] - box[0]:g}, height {box[3] - box[1]:g})")
    return box  # type: ignore[return-value]


def _entry_problem(error: BaseException) -> str:
    """An exception from reading one entry, as a short problem description."""
    if isinstance(error, UnusableEntry):
        return str(error)
    if isinstance(error, KeyError):
        return f"lacks the key {error}"
    return f"{type(error).__name__}: {str(error)[:200]}"


def _coco_file(path: Path, errors: list[DataError]) -> list[RawImage]:
    try:
        coco = json.loads(read_bounded(path, MAX_COCO_BYTES))
    except RecursionError:
        raise AnnotationError(f"{path} is not COCO JSON: nested too deeply") from None
    except (OSError, ValueError, FileRefused) as error:
        raise AnnotationError(f"{path} is not a readable COCO JSON file: {type(error).__name__}: {str(error)[:200]}") from None
    sections = {key: coco.get(key) if isinstance(coco, dict) else None for key in ("images", "annotations", "categories")}
    if not isinstance(sections["images"], list) or not isinstance(sections["categories"], list):
        raise AnnotationError(f"{path} is not COCO JSON: it needs lists of images and categories (and annotations)")
    annotations = sections["annotations"] if isinstance(sections["annotations"], list) else []
    name = path.name
    categories: dict[Any, str] = {}
    for number, category in enumerate(sections["categories"]):
        try:
            categories[_key(category["id"])] = str(category["name"])
        except (KeyError, TypeError, ValueError) as error:
            errors.append(DataError(f"{name}: categories[{number}]", _entry_problem(error)))
    images: dict[Any, RawImage] = {}
    for number, entry in enumerate(sections["images"]):
        try:
            images[_key(entry["id"])] = RawImage(str(entry["file_name"]), f"{name}: images[{number}]", [])
        except (KeyError, TypeError, ValueError) as error:
            errors.append(DataError(f"{name}: images[{number}]", _entry_problem(error)))
    for number, annotation in enumerate(annotations):
        image = None
        try:
            image = images.get(_key(annotation["image_id"]))
            category = categories.get(_key(annotation["category_id"]))
            if image is None:
                raise UnusableEntry(f"image_id {annotation['image_id']!r} names no image")
            if category is None:
                raise UnusableEntry(f"category_id {annotation['category_id']!r} names no category")
            bbox = annotation["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise UnusableEntry(f"bbox {bbox!r} is not [x, y, width, height]")
            x, y, width, height = (float(v) for v in bbox)
            image.objects.append((category, checked_box(x, y, x + width, y + height)))
        except (KeyError, TypeError, ValueError) as error:
            where = f"{name}: annotations[{number}]" + (f" (image {image.file_name!r})" if image is not None else "")
            errors.append(DataError(where, _entry_problem(error)))
    return list(images.values())


def _key(value: Any) -> Any:
    """An id as a dict key: ids are numbers or strings in COCO files; anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UnusableEntry(f"id {value!r} is not a number or a string")
    return value


def _voc_file(path: Path, errors: list[DataError]) -> RawImage | None:
    try:
        root = ElementTree.fromstring(read_bounded(path, MAX_VOC_BYTES))
    except RecursionError:
        raise AnnotationError(f"{path} is not Pascal VOC XML: nested too deeply") from None
    except (OSError, ElementTree.ParseError, FileRefused) as error:
        raise AnnotationError(f"{path} is not a readable Pascal VOC XML file: {type(error).__name__}: {str(error)[:200]}") from None
    file_name = (root.findtext("filename") or PurePosixPath(root.findtext("path") or "").name).strip()
    if not file_name:
        errors.append(DataError(path.name, "no <filename> (nor <path>): the file names no image"))
        return None
    image = RawImage(file_name, path.name, [])
    for number, obj in enumerate(root.iter("object"), start=1):
        try:
            box = obj.find("bndbox")
            if box is None:
                raise UnusableEntry("no <bndbox>")
            texts = {key: box.findtext(key) for key in ("xmin", "ymin", "xmax", "ymax")}
            if missing := [key for key, text in texts.items() if text is None]:
                raise UnusableEntry(f"<bndbox> lacks {', '.join(missing)}")
            xmin, ymin, xmax, ymax = (float(text) for text in texts.values())  # type: ignore[arg-type]
            image.objects.append(((obj.findtext("name") or "").strip(), checked_box(xmin - 1, ymin - 1, xmax, ymax)))
        except ValueError as error:
            errors.append(DataError(f"{path.name}: object {number} (image {file_name!r})", _entry_problem(error)))
    return image
