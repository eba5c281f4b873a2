"""Every torchvision classification family: a default target layer is found, and every applicable method maps.

One builder per family, randomly initialised (no weights can be downloaded), at a small input where the
architecture allows. Where `cam` cannot apply (the head is not GAP + one Linear) the error must say so and name
the methods that can.
"""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from camserve.cam import METHODS, CamExtractor, MethodError

pytestmark = pytest.mark.slow

# builder -> (input side, whether cam applies at the default layer)
FAMILIES = {
    "resnet18": (64, True),
    "resnext50_32x4d": (64, True),
    "wide_resnet50_2": (64, True),
    "densenet121": (64, False),  # ReLU between features and pooling
    "vgg11": (64, False),  # flatten + three Linear layers
    "alexnet": (96, False),
    "squeezenet1_1": (96, False),  # a conv classifier
    "googlenet": (96, True),
    "inception_v3": (299, True),  # below ~200 px its last blocks shrink to 1x1
    "mobilenet_v2": (64, True),
    "mobilenet_v3_small": (64, False),  # Linear - Hardswish - Linear
    "mnasnet0_5": (64, True),
    "shufflenet_v2_x0_5": (64, True),
    "efficientnet_b0": (64, True),
    "efficientnet_v2_s": (64, True),
    "regnet_y_400mf": (64, True),
    "convnext_tiny": (64, False),  # LayerNorm between pooling and Linear
    "vit_b_16": (224, False),  # the class token, not pooling
    "swin_t": (64, True),
    "swin_v2_t": (64, True),
    "maxvit_t": (224, False),  # pooling - LayerNorm - Linear - Tanh - Linear
}
MAP_METHODS = ("cam", "gradcam", "layercam", "eigencam")


@pytest.mark.parametrize("builder", list(FAMILIES))
def test_family_gets_a_default_layer_and_maps(builder: str) -> None:
    side, cam_applies = FAMILIES[builder]
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if builder in ("googlenet", "inception_v3") else {}
    model = models.get_model(builder, weights=None, num_classes=7, **extra).eval()
    if builder == "vit_b_16":
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised by torchvision
    extractor = CamExtractor(model, (side, side))
    inputs = torch.randn(2, 3, side, side)
    for method in MAP_METHODS:
        if method == "cam" and not cam_applies:
            with pytest.raises(MethodError, match="gradcam"):
                extractor(inputs, method=method)
            continue
        result = extractor(inputs, method=method)
        maps = result.maps
        assert maps.shape[:2] == (2, 1), (builder, method, maps.shape)
        assert maps.shape[-1] > 1, (builder, method, maps.shape)
        assert maps.shape[-2] > 1, (builder, method, maps.shape)
        assert torch.isfinite(maps).all()
        assert maps.min() >= 0
        assert maps.max() <= 1
    assert set(MAP_METHODS) <= set(METHODS)


def test_several_layers_fuse_at_the_finest_resolution() -> None:
    torch.manual_seed(0)
    model = models.resnet18(num_classes=5).eval()
    extractor = CamExtractor(model, (64, 64))
    fused = extractor(torch.randn(1, 3, 64, 64), method="gradcam", layers=["layer3", "layer4"])
    assert fused.layers == ("layer3", "layer4")
    assert fused.maps.shape == (1, 1, 4, 4)  # layer3's 4x4, finer than layer4's 2x2
    assert fused.maps.max() == 1.0
