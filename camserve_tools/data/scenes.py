"""Deterministic synthetic scenes: one filled class shape per image on a cluttered, photographic background.

The default model (`shapes`) is trained and evaluated on these, and the tests send them to a real server,
because every scene knows its object's true box: "did the map point at the object?" becomes a measurable fact.

`make_scene(seed)` always returns the same scene for the same seed. Training uses seeds from `TRAIN_SEEDS`,
evaluation and tests draw from `EVAL_SEED_START` upward, so evaluation never sees training scenes. The photographs
behind the scenes are split the same way: training seeds draw from `TRAIN_PHOTOS`, every other seed from
`HELD_OUT_PHOTOS`, so evaluation figures are measured on photographs the model never saw.

The family, chosen to look like what a client sends rather than like the training set of one model:
- 160-400 px on the shorter side, aspect ratio 1.15-3 (log-uniform, either orientation; never square, so a
  swapped width and height shows up in every test);
- backgrounds: random crops (zoom 1-3x, flips, quarter turns, colour jitter) of photographs shipped by
  scikit-image, scikit-learn and matplotlib, or noise and gradients;
- distractors that are no class: straight and bent strokes, arcs, irregular lumpy blobs;
- the object: 15-50 % of the shorter side (circumscribed diameter), any colour and rotation;
- half the scenes are JPEG round trips (quality 60-95), as a client's photo would arrive.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
TRAIN_SEEDS = range(0, 10_000_000)
EVAL_SEED_START = 1_000_000_000
# Scenes for choosing a setting by measurement (the size the default model is served at), so that the evaluation
# figures are not measured on the scenes the choice was made on.
VALIDATION_SEED_START = EVAL_SEED_START + 3_000_000

# (package, path inside it) of photographs that pinned packages ship. Training scenes use the first set only;
# the held-out set (a kitchen, an outdoor scene, a street, a texture and a grey motion-blurred photo) is what
# evaluation and tests see, so their figures come from photographs no training scene contains. motorcycle_right.png
# is left out of both: it is motorcycle_left.png from a few centimetres away.
TRAIN_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/page.png"),
    ("skimage", "data/cell.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
HELD_OUT_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/clock_motion.png"),
)
JPEG_QUALITY = (60, 95)
ASPECT_RANGE = (1.15, 3.0)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive

    @property
    def name(self) -> str:
        return CLASSES[self.label]


@functools.lru_cache(maxsize=2)
def photos(held_out: bool) -> tuple[Image.Image, ...]:
    """The training or the held-out photographs, as RGB. A missing one is an error: scenes would silently
    change with the installed packages otherwise."""
    loaded = []
    for package, relative in HELD_OUT_PHOTOS if held_out else TRAIN_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{package} is not installed; scenes need its sample photographs (requirements.txt)")
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        with Image.open(path) as image:
            loaded.append(image.convert("RGB"))
    return tuple(loaded)


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))  # type: ignore[return-value]


def _photo_background(rng: random.Random, size: tuple[int, int], held_out: bool) -> Image.Image:
    width, height = size
    photo = rng.choice(photos(held_out))
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.ROTATE_90)
    # A random window of the photo, zoomed so that it covers the whole scene (resize with box= crops first).
    zoom = math.exp(rng.uniform(0, math.log(3))) * max(width / photo.width, height / photo.height)
    crop_w, crop_h = width / zoom, height / zoom
    x0, y0 = rng.uniform(0, photo.width - crop_w), rng.uniform(0, photo.height - crop_h)
    image = photo.resize((width, height), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.0, 1.6))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.3))
    return ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))


def _background(rng: random.Random, size: tuple[int, int], held_out: bool) -> Image.Image:
    width, height = size
    np_rng = np.random.default_rng(rng.randrange(2**32))
    kind = rng.choice(("photo", "photo", "photo", "photo", "photo", "noise", "noise", "flat_noise", "gradient"))
    if kind == "photo":
        return _photo_background(rng, size, held_out)
    if kind == "gradient":
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
    """An irregular lumpy polygon, possibly stretched: clutter that is not one of the class shapes."""
    count = rng.randrange(9, 16)
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(3)]
    stretch, tilt = rng.uniform(1.0, 2.5), rng.uniform(0, math.pi)
    points = []
    for i in range(count):
        a = 2 * math.pi * i / count
        r = radius * (1 + 0.35 * math.sin(2 * a + phases[0]) + 0.25 * math.sin(3 * a + phases[1]) + rng.uniform(-0.2, 0.2))
        x, y = r * math.cos(a) * stretch, r * math.sin(a)
        points.append((centre[0] + x * math.cos(tilt) - y * math.sin(tilt), centre[1] + x * math.sin(tilt) + y * math.cos(tilt)))
    return points


def _stroke(rng: random.Random, draw: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
    """A straight line, a bent polyline or an arc: the pen marks and edges of a real picture."""
    width, height = size
    pen = rng.randrange(1, max(2, min(width, height) // 40))
    colour = _random_colour(rng)
    kind = rng.choice(("line", "polyline", "arc"))
    if kind == "arc":
        radius = rng.uniform(0.05, 0.5) * min(width, height)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        start = rng.uniform(0, 360)
        draw.arc((cx - radius, cy - radius, cx + radius, cy + radius), start, start + rng.uniform(30, 200), fill=colour, width=pen)
        return
    points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(2 if kind == "line" else rng.randrange(3, 6))]
    draw.line(points, fill=colour, width=pen, joint="curve")


def _clutter(rng: random.Random, image: Image.Image) -> None:
    draw = ImageDraw.Draw(image)
    width, height = image.size
    short = min(width, height)
    for _ in range(rng.randrange(0, 8)):
        _stroke(rng, draw, image.size)
    for _ in range(rng.randrange(0, 5)):
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        draw.polygon(_blob(rng, centre, rng.uniform(0.03, 0.12) * short), fill=_random_colour(rng))


def _regular_polygon(sides: int, radius: float, rotation: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    return [
        (
            centre[0] + radius * math.cos(rotation + 2 * math.pi * i / sides),
            centre[1] + radius * math.sin(rotation + 2 * math.pi * i / sides),
        )
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
    outline = [
        (half, reach),
        (half, half),
        (reach, half),
        (reach, -half),
        (half, -half),
        (half, -reach),
        (-half, -reach),
        (-half, -half),
        (-reach, -half),
        (-reach, half),
        (-half, half),
        (-half, reach),
    ]
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
    """Width and height: 160-400 px on the shorter side, aspect ratio 1.15-3 (log-uniform), either orientation."""
    short = rng.randrange(160, 400)
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    long = round(short * aspect)
    return (long, short) if rng.random() < 0.5 else (short, long)


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def make_scene(seed: int, size: tuple[int, int] | None = None, clutter: bool = True) -> Scene:
    """The scene of `seed`. `clutter=False` gives the easy variant (plain background, no distractors, lossless)
    that training starts with: a curriculum that gets the network past its long initial plateau quickly."""
    rng = random.Random(seed)
    width, height = size or scene_size(rng)
    label = rng.randrange(len(CLASSES))
    if clutter:
        image = _background(rng, (width, height), held_out=seed not in TRAIN_SEEDS)
        _clutter(rng, image)
    else:
        image = Image.new("RGB", (width, height), _random_colour(rng))
    # Extent (the shape's circumscribed diameter) is 15-50 % of the shorter side.
    radius = rng.uniform(0.15, 0.50) * min(width, height) / 2
    centre = (rng.uniform(radius + 1, width - radius - 1), rng.uniform(radius + 1, height - radius - 1))
    outline = _shape_outline(CLASSES[label], radius, rng.uniform(0, 2 * math.pi), centre)
    xs, ys = [p[0] for p in outline], [p[1] for p in outline]
    box = (
        max(0, math.floor(min(xs))),
        max(0, math.floor(min(ys))),
        min(width, math.ceil(max(xs)) + 1),
        min(height, math.ceil(max(ys)) + 1),
    )
    ImageDraw.Draw(image).polygon(outline, fill=_contrasting_colour(rng, image, box))
    if clutter and rng.random() < 0.5:
        image = _jpeg_round_trip(image, rng.randint(*JPEG_QUALITY))
    return Scene(image=image, label=label, box=box)
