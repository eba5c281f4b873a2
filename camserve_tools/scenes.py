"""Deterministic synthetic scenes: one filled class shape per image on a cluttered background.

The default model (`shapes`) is trained and evaluated on these, and the tests send them to a real server,
because every scene knows its object's true box: "did the map point at the object?" becomes a measurable fact.

`make_scene(seed)` always returns the same scene for the same seed. Training uses seeds from
`TRAIN_SEEDS`, evaluation and tests draw from `EVAL_SEED_START` upward, so evaluation never sees training scenes.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
TRAIN_SEEDS = range(0, 10_000_000)
EVAL_SEED_START = 1_000_000_000

# (package, path inside it) of natural photographs that installed packages ship; used when present.
_PHOTO_SOURCES = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive

    @property
    def name(self) -> str:
        return CLASSES[self.label]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    found = []
    for package, relative in _PHOTO_SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.exists():
            found.append(Image.open(path).convert("RGB"))
    return tuple(found)


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))  # type: ignore[return-value]


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    width, height = size
    np_rng = np.random.default_rng(rng.randrange(2**32))
    kind = rng.choice(("flat_noise", "gradient", "noise", "photo", "photo"))
    photos = _photos()
    if kind == "photo" and photos:
        photo = rng.choice(photos)
        # A random window of the photo, zoomed so that it covers the whole scene (resize with box= crops first).
        zoom = rng.uniform(1.0, 2.0) * max(width / photo.width, height / photo.height)
        crop_w, crop_h = width / zoom, height / zoom
        x0, y0 = rng.uniform(0, photo.width - crop_w), rng.uniform(0, photo.height - crop_h)
        image = photo.resize((width, height), box=(x0, y0, x0 + crop_w, y0 + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image
    if kind == "gradient" or (kind == "photo" and rng.random() < 0.5):
        start = np.array(_random_colour(rng), dtype=np.float32)
        end = np.array(_random_colour(rng), dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) / width + ys * math.sin(angle) / height
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        pixels = start + t[..., None] * (end - start)
        pixels += np_rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(0, 12)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    base = np.array(_random_colour(rng), dtype=np.float32)
    sigma = rng.uniform(5, 25) if kind == "flat_noise" else rng.uniform(25, 60)
    pixels = base + np_rng.standard_normal((height, width, 3), dtype=np.float32) * sigma
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if kind == "noise":
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3)))
    return image


def _blob(rng: random.Random, centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """An irregular lumpy polygon: clutter that is not one of the class shapes."""
    count = rng.randrange(9, 16)
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(3)]
    points = []
    for i in range(count):
        a = 2 * math.pi * i / count
        r = radius * (1 + 0.35 * math.sin(2 * a + phases[0]) + 0.25 * math.sin(3 * a + phases[1]) + rng.uniform(-0.2, 0.2))
        points.append((centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)))
    return points


def _clutter(rng: random.Random, image: Image.Image) -> None:
    draw = ImageDraw.Draw(image)
    width, height = image.size
    short = min(width, height)
    for _ in range(rng.randrange(0, 7)):
        start = (rng.uniform(0, width), rng.uniform(0, height))
        end = (rng.uniform(0, width), rng.uniform(0, height))
        draw.line([start, end], fill=_random_colour(rng), width=rng.randrange(1, max(2, short // 60)))
    for _ in range(rng.randrange(0, 4)):
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        draw.polygon(_blob(rng, centre, rng.uniform(0.03, 0.08) * short), fill=_random_colour(rng))


def _regular_polygon(sides: int, radius: float, rotation: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    return [
        (centre[0] + radius * math.cos(rotation + 2 * math.pi * i / sides), centre[1] + radius * math.sin(rotation + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _star(radius: float, rotation: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.42
        a = rotation + math.pi * i / 5
        points.append((centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)))
    return points


def _cross(radius: float, rotation: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    # A plus sign whose arm ends touch the circle of `radius`; arm half-width a third of the radius.
    half = radius / 3
    reach = math.sqrt(radius**2 - half**2)
    outline = [(half, reach), (half, half), (reach, half), (reach, -half), (half, -half), (half, -reach),
               (-half, -reach), (-half, -half), (-reach, -half), (-reach, half), (-half, half), (-half, reach)]
    cos, sin = math.cos(rotation), math.sin(rotation)
    return [(centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos) for x, y in outline]


def _shape_outline(name: str, radius: float, rotation: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    if name == "circle":
        return _regular_polygon(96, radius, rotation, centre)
    if name == "square":
        return _regular_polygon(4, radius, rotation, centre)
    if name == "triangle":
        return _regular_polygon(3, radius, rotation, centre)
    if name == "hexagon":
        return _regular_polygon(6, radius, rotation, centre)
    if name == "star":
        return _star(radius, rotation, centre)
    if name == "cross":
        return _cross(radius, rotation, centre)
    raise ValueError(f"unknown shape {name!r}")


def _contrasting_colour(rng: random.Random, image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """A random colour far enough from the background under the shape to be seen."""
    local = np.asarray(image.crop(box), dtype=np.float32).reshape(-1, 3).mean(axis=0)
    best, best_distance = _random_colour(rng), -1.0
    for _ in range(12):
        colour = _random_colour(rng)
        distance = float(np.abs(np.array(colour) - local).sum())
        if distance > 160:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def scene_size(rng: random.Random) -> tuple[int, int]:
    """Width and height, about 160-640 px and never square (aspect 1.15-1.34, either orientation)."""
    short = rng.randrange(160, 400)
    long = min(640, int(short * rng.uniform(1.15, 1.34)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_scene(seed: int, size: tuple[int, int] | None = None, clutter: bool = True) -> Scene:
    """The scene of `seed`. `clutter=False` gives the easy variant (plain background, no distractors) that
    training starts with: a curriculum that gets the network past its long initial plateau quickly."""
    rng = random.Random(seed)
    width, height = size or scene_size(rng)
    label = rng.randrange(len(CLASSES))
    if clutter:
        image = _background(rng, (width, height))
        _clutter(rng, image)
    else:
        image = Image.new("RGB", (width, height), _random_colour(rng))
    # Extent (the shape's circumscribed diameter) is 15-50 % of the shorter side.
    radius = rng.uniform(0.15, 0.50) * min(width, height) / 2
    centre = (rng.uniform(radius + 1, width - radius - 1), rng.uniform(radius + 1, height - radius - 1))
    outline = _shape_outline(CLASSES[label], radius, rng.uniform(0, 2 * math.pi), centre)
    xs, ys = [p[0] for p in outline], [p[1] for p in outline]
    box = (max(0, math.floor(min(xs))), max(0, math.floor(min(ys))), min(width, math.ceil(max(xs)) + 1), min(height, math.ceil(max(ys)) + 1))
    ImageDraw.Draw(image).polygon(outline, fill=_contrasting_colour(rng, image, box))
    return Scene(image=image, label=label, box=box)
