"""Our maps equal pytorch-grad-cam's and torchcam's (≤ 1e-4 after ReLU + min-max) on random torchvision models.

Both libraries serve as oracles for every method they share with us, at the target layer's own resolution (their
upsampling to the input size is switched off so that nothing but the method is compared). Small inputs and small
configurations of the transformer families keep this fast; the code paths are the same as at full size. Models
run in float64: methods that divide by sums of activations (XGrad-CAM, Grad-CAM++) amplify float32 rounding on
random weights, and the point here is the formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torchcam import methods as torchcam_methods
from torchvision import models

from camserve.cam import CamExtractor, normalize_maps, to_grid

# Six architectures in float64, Score-CAM among the methods (one forward pass per channel): the slowest oracle checks.
pytestmark = pytest.mark.slow

GRAD_CAM_LIBRARY = {
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
}
# torchcam's Grad-CAM++ divides a masked copy (alpha[mask].div_), so its alpha stays g^2: not a usable oracle.
TORCHCAM = {
    "cam": torchcam_methods.CAM,
    "gradcam": torchcam_methods.GradCAM,
    "xgradcam": torchcam_methods.XGradCAM,
    "layercam": torchcam_methods.LayerCAM,
}


def vit() -> torch.nn.Module:
    model = models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises it: no gradient would flow
    return model


def swin() -> torch.nn.Module:
    return models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[4, 4], num_classes=10
    )


# (name, builder, input side, expected default layer, layer compared with the references)
MODELS = [
    ("resnet18", lambda: models.resnet18(num_classes=10), 64, "layer4", "layer4"),
    ("mobilenet_v3_small", lambda: models.mobilenet_v3_small(num_classes=10), 128, "features", "features"),
    # DenseNet applies ReLU in place right after `features`; pytorch-grad-cam's stored activations share storage
    # with that output and so see the ReLU'd values, ours are what the module returned. Compared one block up.
    ("densenet121", lambda: models.densenet121(num_classes=10), 64, "features", "features.denseblock4"),
    ("convnext_tiny", lambda: models.convnext_tiny(num_classes=10), 64, "features", "features"),
    ("vit", vit, 64, "encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.ln_1"),
    ("swin", swin, 64, "permute", "permute"),
]


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def case(request):
    name, build, side, expected_layer, compared_layer = request.param
    torch.manual_seed(0)
    model = build().eval().double()
    # Random heads give tiny scores and maps; pytorch-grad-cam's normalisation adds 1e-7 to the maximum, which
    # would then show. Larger head weights keep every map far above that epsilon.
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(1000)
    inputs = torch.randn(2, 3, side, side, dtype=torch.float64)
    default_layers = CamExtractor(model, (side, side)).default_layers
    extractor = CamExtractor(model, (side, side), [compared_layer], scorecam_max_channels=10_000)
    return name, model, inputs, extractor, (default_layers, expected_layer)


def test_default_layer_is_the_last_spatial_map_the_score_depends_on(case) -> None:
    _, _, _, _, (default_layers, expected_layer) = case
    assert default_layers == (expected_layer,)


def _reshape_for(model: torch.nn.Module):
    """pytorch-grad-cam's reshape_transform: ViT tokens to a grid, exactly as we read them."""
    return to_grid if isinstance(model, models.VisionTransformer) else None


@pytest.mark.parametrize("method", sorted(GRAD_CAM_LIBRARY))
def test_equal_to_pytorch_grad_cam(case, method: str) -> None:
    name, model, inputs, extractor, _ = case
    if method == "scorecam" and name not in ("resnet18", "mobilenet_v3_small"):
        pytest.skip("Score-CAM costs one forward pass per channel: checked on two CNNs")
    ours = extractor(inputs, method=method)
    layer = model.get_submodule(extractor.default_layers[0])
    height, width = ours.maps.shape[-2:]
    reference = GRAD_CAM_LIBRARY[method](model=model, target_layers=[layer], reshape_transform=_reshape_for(model))
    reference.get_target_width_height = lambda _: (width, height)  # compare at the layer's resolution
    if method == "scorecam":
        reference.batch_size = 64
    targets = [ClassifierOutputTarget(int(t)) for t in ours.targets[:, 0]]
    theirs = reference(input_tensor=inputs, targets=targets)
    np.testing.assert_allclose(ours.maps[:, 0].numpy(), theirs, atol=1e-4)


def test_eigencam_equals_pytorch_grad_cam_up_to_the_svd_sign(case) -> None:
    """A singular vector's sign is arbitrary: ours is oriented, theirs is whatever LAPACK returns."""
    _, model, inputs, extractor, _ = case
    ours = extractor(inputs, method="eigencam").maps[:, 0]
    layer = model.get_submodule(extractor.default_layers[0])
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, output: captured.setdefault("output", output.detach()))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    projection = torch.from_numpy(get_2d_projection(to_grid(captured["output"]).numpy().copy()))
    height, width = ours.shape[-2:]
    reference = EigenCAM(model=model, target_layers=[layer], reshape_transform=_reshape_for(model))
    reference.get_target_width_height = lambda _: (width, height)
    theirs = torch.from_numpy(reference(input_tensor=inputs, targets=None))  # grad-cam 1.5.7: targets is required; None = top class
    for sample in range(len(inputs)):
        orientations = [normalize_maps(projection[sample].clamp(min=0)), normalize_maps((-projection[sample]).clamp(min=0))]
        assert min(float((ours[sample] - o).abs().max()) for o in orientations) <= 1e-4
        assert min(float((theirs[sample] - o).abs().max()) for o in orientations) <= 1e-4


@pytest.mark.parametrize("method", sorted(TORCHCAM))
def test_equal_to_torchcam(case, method: str) -> None:
    name, model, inputs, extractor, _ = case
    if name in ("vit", "swin"):
        pytest.skip("torchcam reads token outputs without a reshape; compared through pytorch-grad-cam instead")
    if method == "xgradcam" and name == "mobilenet_v3_small":
        # XGrad-CAM divides by each channel's activation sum; Hardswish outputs can be negative, so some sums are
        # ~0 and the epsilon decides. We follow pytorch-grad-cam's 1e-7 (that comparison passes); torchcam uses 1e-8.
        pytest.skip("epsilon-dominated on channels whose activations sum to ~0")
    layer_name = extractor.default_layers[0]
    try:
        ours = extractor(inputs, method=method)
    except ValueError as error:
        refusal: ValueError | None = error
    else:
        refusal = None
    if refusal is not None:  # cam on a head that is not GAP + Linear: our error names the alternatives
        assert method == "cam"
        assert "gradcam" in str(refusal)
        return
    with TORCHCAM[method](model, target_layer=layer_name, input_shape=tuple(inputs.shape[1:])) as reference:
        scores = model(inputs)
        raw = reference(ours.targets[:, 0].tolist(), scores, normalized=False)[0].detach()
    # torchcam's CAM keeps negative values; ours applies ReLU (see camserve.cam.methods.cam): compare alike.
    theirs = normalize_maps(raw.clamp(min=0))
    np.testing.assert_allclose(ours.maps[:, 0].numpy(), theirs.numpy(), atol=1e-4)
