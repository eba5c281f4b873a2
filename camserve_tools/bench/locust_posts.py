"""A pool image posted by a Locust user and its answer checked: the task of every Locust file (load_tests/)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from camserve_tools.data.image_pool import Sample, image_pool


def post_pool_image(
    client: Any,
    pool_size: int,
    path: str,
    name: str,
    headers: dict[str, str],
    check: Callable[[Any, Sample], None],
    wrong_answers: tuple[type[Exception], ...],
) -> None:
    """POST a random image of the pool to `path` (reported as `name`) with its content type and `headers`; the
    request fails in Locust's figures where `check(response, sample)` raises one of `wrong_answers`."""
    sample = random.choice(image_pool(pool_size))
    # Locust annotates `data` as str or dict, but sends bytes as they are: an image body must not be re-encoded.
    with client.post(
        path, data=sample.body, headers={"Content-Type": sample.content_type, **headers}, name=name, catch_response=True
    ) as response:
        try:
            check(response, sample)
        except wrong_answers as error:
            response.failure(f"{type(error).__name__}: {error}")
        else:
            response.success()
