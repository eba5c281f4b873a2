"""The committed default model: loose quality floors on a small sample, and the randomisation sanity check.

The full figures (1,000 fresh scenes) are in docs/shapes-model.md, from `make evaluate`.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from support import ROOT, TEST_SEED_START

from camserve.cam import METHODS, CamExtractor
from camserve.model_spec import ModelSpec, build_architecture, load_model
from camserve.preprocessing import whole_image_transform
from camserve_tools.quality.shapes_quality import Quality, evaluate

pytestmark = pytest.mark.slow

MODEL_DIR = ROOT / "models" / "shapes"


def spec() -> ModelSpec:
    return ModelSpec.from_model_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def sample_quality() -> Quality:
    return evaluate(MODEL_DIR, "gradcam", scenes=96, first_seed=TEST_SEED_START + 1000)


def test_quality_floors_on_a_small_sample(sample_quality: Quality) -> None:
    """A regression guard on the committed weights, floors they meet: what they reach on the scene family
    (1,000 scenes: 94.3 % / 90.1 % / 77.5 %) less about two standard errors of a 96-scene sample.

    The product target (top-1 >= 97 %, pointing game >= 92 %, box IoU >= 0.5 on >= 70 %) is not met yet and lives
    in docs/shapes-model.md with the model's full figures (`make evaluate`), not here."""
    assert sample_quality.top1 >= 0.89
    assert sample_quality.pointing >= 0.84
    assert sample_quality.iou_050 >= 0.69


@pytest.mark.parametrize("method", sorted(m.name for m in METHODS.values() if m.needs_gradients))
def test_maps_decorrelate_when_the_weights_are_randomised(scenes, method: str) -> None:
    """Adebayo et al. 2018, "Sanity Checks for Saliency Maps": a map that survives re-initialising the weights
    shows the input, not what the model learned."""
    trained = load_model(spec(), MODEL_DIR)
    torch.manual_seed(0)
    randomised = build_architecture(spec().architecture, spec().num_classes).eval()
    transform = whole_image_transform(spec().input_size, spec().mean, spec().std)
    inputs = torch.stack([transform(scene.image) for scene in scenes[:8]])
    targets = torch.tensor([scene.label for scene in scenes[:8]])
    maps = {
        name: CamExtractor(model, spec().input_size)(inputs, method=method, targets=targets).maps[:, 0]
        for name, model in (("trained", trained), ("random", randomised))
    }
    correlations = [
        spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic for a, b in zip(maps["trained"], maps["random"], strict=True)
    ]
    correlations = [0.0 if c != c else c for c in correlations]  # a constant map has no rank correlation
    assert sum(correlations) / len(correlations) < 0.5, correlations
