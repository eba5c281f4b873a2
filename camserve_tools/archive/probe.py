"""Archive-time check, run on an unpacked archive exactly as a TorchServe worker would see it.

    python -m camserve_tools.archive.probe <unpacked archive dir>

Only the archive's own files are importable (its directory first on sys.path, PYTHONPATH empty, cwd there),
so a model file that imports something the archive lacks fails here and not in a worker. Builds the model from
model-config.yaml, loads its weights, runs forwards at two batch sizes on real images (RGB pictures of other sizes
than the model's, through the served preprocessing: resize and the archive's normalisation), finds the target
layer(s) and computes the default method's map. Prints one JSON line: {"num_classes", "layers"} or
{"error": "<one line>"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{type(error).__name__}: {text}"[:600]


# (width, height) of the probe pictures: neither square nor the model's input size, so the resize really runs.
PROBE_IMAGE_SIZES = ((173, 111), (64, 97))


def probe_images(sizes: tuple[tuple[int, int], ...] = PROBE_IMAGE_SIZES) -> list:
    """RGB pictures with structure at every scale (colour gradients and fixed-seed noise), as PIL images: what a
    client sends, after decoding."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    images = []
    for width, height in sizes:
        y, x = np.mgrid[0:height, 0:width]
        gradient = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1)
        pixels = 0.7 * gradient + 0.3 * generator.random((height, width, 3))
        images.append(Image.fromarray((pixels * 255).astype(np.uint8), "RGB"))
    return images


def model_inputs(spec, count: int):
    """A batch of `count` probe pictures through the served preprocessing (camserve.preprocessing), as a worker
    builds a batch; None when the normalisation turns them into inf or nan."""
    import torch

    from camserve.preprocessing import whole_image_transform

    transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
    batch = torch.stack([transform(image) for image in probe_images()[:count]])
    return batch if torch.isfinite(batch).all() else None


def probe(root: Path) -> dict:
    import torch

    from camserve.cam import CamExtractor
    from camserve.model_spec import EXPORTED, ModelSpec, load_model

    spec = ModelSpec.from_model_dir(root)
    try:
        model = load_model(spec, root)
    except Exception as error:  # noqa: BLE001 - any failure to build or load is reported, one line
        return {"error": f"cannot build the model and load its weights: {one_line(error)}"}
    num_classes = None
    for batch in (2, 1):
        preprocessing = f"the preprocessing (INPUT_SIZE={list(spec.input_size)}, MEAN={list(spec.mean)}, STD={list(spec.std)})"
        try:
            inputs = model_inputs(spec, batch)
        except Exception as error:  # noqa: BLE001 - torchvision refuses a std that rounds to zero, for one
            return {"error": f"{preprocessing} fails on a real image: {one_line(error)}"}
        if inputs is None:
            return {"error": f"{preprocessing} turns a real image into inf or nan"}
        try:
            with torch.inference_mode():
                output = model(inputs)
        except Exception as error:  # noqa: BLE001
            hint = ""
            if spec.architecture == EXPORTED:
                hint = (
                    " (an exported program accepts only the shapes it was exported for: export with a dynamic batch "
                    "dimension, dynamic_shapes={'x': {0: torch.export.Dim('batch')}}, and give INPUT_SIZE= as exported)"
                )
            return {"error": f"a forward pass on a {tuple(inputs.shape)} input fails{hint}: {one_line(error)}"}
        if not isinstance(output, torch.Tensor):
            return {"error": f"the model returns {type(output).__name__}, not a (batch, classes) tensor of logits"}
        if output.dim() != 2 or output.shape[0] != batch or output.shape[1] < 2:
            return {"error": f"the model's output for a batch of {batch} has shape {tuple(output.shape)}, not (batch, classes) logits"}
        if not torch.isfinite(output).all():
            return {"error": f"the model's logits for a batch of {batch} real images are not finite (inf or nan)"}
        if num_classes not in (None, output.shape[1]):
            return {"error": f"the model gives {num_classes} classes at batch 2 and {output.shape[1]} at batch 1"}
        num_classes = int(output.shape[1])
    try:
        extractor = CamExtractor(model, spec.input_size, spec.target_layers or None, spec.scorecam_max_channels)
        for method in dict.fromkeys((spec.method, "gradcam")):
            maps = extractor(model_inputs(spec, 1), method=method).maps
            if not torch.isfinite(maps).all():
                return {"error": f"method {method!r} gives non-finite maps at layer(s) {list(extractor.default_layers)}"}
    except Exception as error:  # noqa: BLE001 - LayerError, MethodError, a hook that cannot run...
        return {"error": f"no class activation map from this model: {one_line(error)}"}
    return {"num_classes": num_classes, "layers": list(extractor.default_layers)}


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    # As in a worker: the archive first, nothing of the repository (this script's own folder included).
    sys.path[:] = [str(root)] + [p for p in sys.path[1:] if p and Path(p).resolve() != Path(__file__).resolve().parents[2]]
    try:
        result = probe(root)
    except Exception as error:  # noqa: BLE001
        result = {"error": one_line(error)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
