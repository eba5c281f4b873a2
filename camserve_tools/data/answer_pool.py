"""The images whose default answers must stay small: every photograph that scikit-image and scikit-learn ship and
that loads without a download, plus generated scenes (camserve_tools/bench/answer_size.py, tests/test_answer_size.py)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

# skimage.data's photographs (not its drawings, masks and test patterns); none needs a download.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "text",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SCENES = 24
SCENE_SEED_START = EVAL_SEED_START + 8_000_000  # its own seed range, apart from evaluation, tests and load tests


def photo_pool(size: tuple[int, int] = (640, 480)) -> dict[str, bytes]:
    """Name -> PNG bytes of every pool image, resized to `size`."""
    import skimage.data
    import sklearn.datasets

    images = {}
    for name in SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        images[name] = Image.fromarray(array[0] if isinstance(array, tuple) else array).convert("RGB")
    for name in SKLEARN_PHOTOS:
        images[name] = Image.open(Path(sklearn.datasets.__file__).parent / "images" / name).convert("RGB")
    for index in range(SCENES):
        images[f"scene {index}"] = make_scene(SCENE_SEED_START + index).image
    pool = {}
    for name, image in images.items():
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BILINEAR).save(buffer, format="PNG")
        pool[name] = buffer.getvalue()
    return pool
