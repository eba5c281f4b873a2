"""Image -> model input. The whole image is resized (never cropped), so a map covers every pixel the user sent."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms


def whole_image_transform(size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Resize the whole RGB image to `size` (an int means square), then normalise.

    torchvision's usual eval recipe (Resize(256) + CenterCrop(224)) would cut off borders that the map then could
    not show; squashing the aspect ratio instead keeps every pixel, and the map is resized back to the original.
    """
    height, width = (size, size) if isinstance(size, int) else size
    return transforms.Compose(
        [
            transforms.Resize((height, width), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
