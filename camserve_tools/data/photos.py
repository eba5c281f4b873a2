"""Real photographs shipped by installed packages (scikit-image, scikit-learn), with what they show.

Used to establish the ImageNet model's preprocessing (scripts/evaluate_imagenet.py), by its tests and by the README
figure. `family` is the set of ImageNet-1k class names that count as right for the photo; `boxes` are drawn by
hand on the photo (x0, y0, x1, y1, x1/y1 exclusive): where the map's peak must fall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

CATS = frozenset({"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"})
COFFEE = frozenset({"espresso", "cup", "coffee mug"})


@dataclass(frozen=True)
class Photo:
    name: str
    family: frozenset[str]
    box: tuple[int, int, int, int] | None = None  # the object, where a test checks the peak
    object_crop: tuple[int, int, int, int] | None = None  # the part pasted onto other photos in composites
    source: str = field(default="", compare=False)

    def image(self) -> Image.Image:
        return load(self.name)


def load(name: str) -> Image.Image:
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name)).convert("RGB")
    import skimage.data

    array = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        array = array[0]  # (left, right, disparity): the left view
    return Image.fromarray(np.asarray(array)).convert("RGB")


# The photos with an ImageNet-1k class, for measuring accuracy; the first two are the test subjects.
LABELLED = [
    # Boxes drawn by eye on the images as scikit-image 0.26 ships them: the cat's head and chest; the cup with its
    # handle, without the saucer (what the classes name). camserve_tools.data.photo_dataset uses the same boxes.
    Photo("chelsea", CATS, box=(15, 0, 400, 300), object_crop=(40, 0, 400, 300), source="skimage.data.chelsea"),
    Photo("coffee", COFFEE, box=(172, 18, 410, 308), object_crop=(70, 10, 485, 395), source="skimage.data.coffee"),
    Photo("rocket", frozenset({"missile", "projectile", "space shuttle"}), source="skimage.data.rocket"),
    Photo("stereo_motorcycle", frozenset({"moped", "motor scooter"}), source="skimage.data.stereo_motorcycle"),
    Photo("camera", frozenset({"tripod", "reflex camera", "Polaroid camera"}), source="skimage.data.camera"),
    Photo("clock", frozenset({"wall clock", "analog clock"}), source="skimage.data.clock"),
    Photo(
        "china.jpg",
        frozenset({"bell cote", "palace", "monastery", "church", "dome", "stupa", "mosque"}),
        source="sklearn.datasets.load_sample_image('china.jpg')",
    ),
]
# Backgrounds for composites: photos without a cat or a coffee cup.
BACKGROUNDS = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class Composite:
    image: Image.Image
    box: tuple[int, int, int, int]  # where the object was pasted
    subject: Photo
    background: str


def composite(subject: Photo, background: str, seed: int, scale: float = 0.45) -> Composite:
    """`subject`'s object, its width `scale` of the background's, pasted at a random place on `background`."""
    assert subject.object_crop is not None
    rng = random.Random(seed)
    canvas = load(background)
    piece = subject.image().crop(subject.object_crop)
    width = round(canvas.width * scale)
    height = round(piece.height * width / piece.width)
    piece = piece.resize((width, height), Image.Resampling.LANCZOS)
    x, y = rng.randrange(0, canvas.width - width + 1), rng.randrange(0, canvas.height - height + 1)
    canvas.paste(piece, (x, y))
    return Composite(canvas, (x, y, x + width, y + height), subject, background)
