"""The images every load test and benchmark sends: generated scenes of realistic sizes, encoded once per process.

No Locust import here: the load test (locustfile.py) and the serving benchmark (benchmark_locustfile.py) share it,
and importing one locustfile from another would register its event listeners twice.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

# Load tests draw their own seed range (evaluation from EVAL_SEED_START, tests from + 5,000,000).
LOAD_SEED_START = EVAL_SEED_START + 7_000_000
# Every fourth image has a camera / web size, so decoding, resizing and full-size heat maps get their share.
CAMERA_SIZES: tuple[tuple[int, int], ...] = ((1024, 768), (1280, 720), (1280, 960))


@dataclass(frozen=True)
class Sample:
    body: bytes
    content_type: str
    size: tuple[int, int]  # width, height: what every heat map and overlay must match


def encode_sample(index: int) -> Sample:
    """Scene `index` of the pool, PNG or JPEG in turn (camera-sized ones are JPEG, as photos are)."""
    size = CAMERA_SIZES[index // 4 % len(CAMERA_SIZES)] if index % 4 == 3 else None
    image = make_scene(LOAD_SEED_START + index, size=size).image
    image_format = "JPEG" if index % 2 else "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, quality=90)
    return Sample(body=buffer.getvalue(), content_type=f"image/{image_format.lower()}", size=image.size)


@functools.lru_cache(maxsize=1)
def image_pool(size: int) -> tuple[Sample, ...]:
    """Generated and encoded once per process, before the test starts, so no request pays for it."""
    return tuple(encode_sample(index) for index in range(size))
