"""The maps on small hand-computed examples, and CAM = Grad-CAM up to scale for a GAP + Linear head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camserve.cam import METHODS, CamExtractor, LayerCapture, MethodError, find_target_layer, normalize_maps
from camserve.cam.localization import bounding_box, box_iou, peak, upsample_map
from camserve.models.shapes_net import ShapesNet


class TinyNet(nn.Module):
    """A 1x1 conv with fixed weights (the 'trunk'), GAP, and a Linear head: every map is computable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 0.5], [-1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


# Input 2x2: A_0 = x, A_1 = -x.
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])


def test_cam_by_hand() -> None:
    # Class 0: 2 * x + 0.5 * (-x) = 1.5 x -> [[1.5, 3], [4.5, 6]]; min-max -> [[0, 1/3], [2/3, 1]].
    result = CamExtractor(TinyNet(), (2, 2), ["features"])(X, method="cam", targets=torch.tensor([0]))
    torch.testing.assert_close(result.maps[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))


def test_gradcam_by_hand() -> None:
    # dy_1/dA_k = w_1k / 4 = [-0.25, 0.25]; sum_k a_k A_k = -0.25 x + 0.25 (-x) = -0.5 x: all negative, ReLU -> 0.
    net = TinyNet()
    result = CamExtractor(net, (2, 2), ["features"])(X, method="gradcam", targets=torch.tensor([1]))
    assert torch.count_nonzero(result.maps) == 0
    # Class 0: a = [0.5, 0.125] -> 0.5 x - 0.125 x = 0.375 x > 0 -> min-max of x.
    result = CamExtractor(net, (2, 2), ["features"])(X, method="gradcam", targets=torch.tensor([0]))
    torch.testing.assert_close(result.maps[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))


def test_hirescam_and_layercam_by_hand() -> None:
    activations = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    gradients = torch.tensor([[[[1.0, -1.0]], [[-2.0, 0.5]]]])
    capture = LayerCapture(activations=activations, gradients=gradients)
    # HiResCAM: sum_k g*A = [1*1 + (-2)*3, -1*2 + 0.5*0] = [-5, -2]
    torch.testing.assert_close(METHODS["hirescam"].compute(capture), torch.tensor([[[-5.0, -2.0]]]))
    # LayerCAM: sum_k ReLU(g)*A = [1*1 + 0, 0 + 0.5*0] = [1, 0]
    torch.testing.assert_close(METHODS["layercam"].compute(capture), torch.tensor([[[1.0, 0.0]]]))


def test_cam_equals_gradcam_up_to_scale_on_gap_linear_head() -> None:
    torch.manual_seed(0)
    model = ShapesNet().eval()
    inputs = torch.randn(4, 3, 64, 64)
    extractor = CamExtractor(model, (64, 64))
    assert extractor.default_layers == ("features",)
    targets = torch.tensor([0, 1, 2, 3])
    cam = extractor(inputs, method="cam", targets=targets).maps
    grad = extractor(inputs, method="gradcam", targets=targets).maps
    assert cam.shape == grad.shape == (4, 1, 8, 8)
    # Grad-CAM's weights are the head's weights / HW, so Grad-CAM = ReLU(CAM) after min-max normalisation.
    with torch.no_grad():
        features = model.features(inputs)
    relu_cam = normalize_maps(torch.einsum("bk,bkhw->bhw", model.fc.weight[targets], features).clamp(min=0))
    torch.testing.assert_close(grad[:, 0], relu_cam, atol=1e-5, rtol=1e-4)
    # Before ReLU and normalisation: Grad-CAM's raw map is exactly CAM's divided by H*W.
    activations = features.clone().requires_grad_(True)
    scores = model.fc(activations.mean(dim=(2, 3))).gather(1, targets[:, None]).sum()
    (gradients,) = torch.autograd.grad(scores, activations)
    raw_cam = METHODS["cam"].compute(LayerCapture(activations=features, class_weights=model.fc.weight[targets]))
    raw_grad = METHODS["gradcam"].compute(LayerCapture(activations=features, gradients=gradients))
    torch.testing.assert_close(raw_grad * 64, raw_cam, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cam[:, 0], normalize_maps(raw_cam.clamp(min=0)))
    torch.testing.assert_close(cam, grad, atol=1e-5, rtol=1e-4)


def test_gradients_stop_at_the_target_layer() -> None:
    """The trunk before the target layer must record no autograd graph (that is what keeps maps cheap)."""
    model = ShapesNet().eval()
    recorded: dict[str, bool] = {}

    def record(name: str):
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            recorded[name] = output.requires_grad

        return hook

    model.features[0].register_forward_hook(record("early"))
    model.fc.register_forward_hook(record("head"))
    CamExtractor(model, (64, 64))(torch.randn(1, 3, 64, 64), method="gradcam")
    assert recorded == {"early": False, "head": True}
    assert len(model.features._forward_hooks) == 0  # no hook of ours left behind
    assert torch.is_grad_enabled()  # the caller's grad mode is restored


def test_closed_form_gradients_after_the_first_call_equal_autograd() -> None:
    """Once a GAP + Linear head is verified, dy/dA = W[c] / HW replaces the backward pass, with the same maps."""
    torch.manual_seed(1)
    model = ShapesNet().eval()
    inputs = torch.randn(3, 3, 64, 64)
    for method in ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam"):
        extractor = CamExtractor(model, (64, 64))
        first = extractor(inputs, method=method).maps  # autograd, and verifies the head
        assert extractor._gap_linear == {"features": True}
        again = extractor(inputs, method=method).maps  # closed form under inference_mode
        torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-4)


def test_cam_refuses_a_head_that_is_not_gap_linear() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    extractor = CamExtractor(model, (8, 8), ["1"])
    with pytest.raises(MethodError, match="gradcam"):
        extractor(torch.randn(1, 3, 8, 8), method="cam")
    assert extractor(torch.randn(1, 3, 8, 8), method="gradcam").maps.shape == (1, 1, 6, 6)


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(MethodError, match="gradcam"):
        CamExtractor(ShapesNet(), (32, 32))(torch.randn(1, 3, 32, 32), method="nope")


def test_find_target_layer_on_a_cnn() -> None:
    assert find_target_layer(ShapesNet(), (64, 64)) == "features"


def test_localization_helpers() -> None:
    heatmap = torch.zeros(10, 20)
    heatmap[2:5, 3:8] = 1.0  # the large region
    heatmap[8, 18] = 0.9  # a separate small one
    assert bounding_box(heatmap) == (3, 2, 8, 5)
    assert peak(heatmap) == (3, 2)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert upsample_map(torch.ones(4, 4), (30, 20)).shape == (20, 30)


def labelled_box(heatmap: torch.Tensor, threshold: float = 0.2) -> tuple[int, int, int, int]:
    """The reference: label every pixel with scipy.ndimage (4-connected), keep the largest region (first on ties)."""
    import numpy as np
    from scipy import ndimage

    labels, count = ndimage.label((heatmap >= threshold * float(heatmap.max())).numpy())
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    ys, xs = np.nonzero(labels == int(sizes.argmax()))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_bounding_box_is_the_box_of_labelling_every_pixel() -> None:
    generator = torch.Generator().manual_seed(0)
    for case in range(400):
        h, w, height, width = (int(v) for v in torch.randint(1, 40, (4,), generator=generator))
        kind = case % 4
        if kind == 0:  # an upsampled map, as served
            heatmap = upsample_map(torch.rand(h, w, generator=generator), (width, height))
        elif kind == 1:  # plateaus: equal values, several regions of equal size
            heatmap = upsample_map(torch.floor(torch.rand(h, w, generator=generator) * 3) / 3, (width, height))
        elif kind == 2:  # pixel noise: many runs per row, many regions, ties
            heatmap = (torch.rand(height, width, generator=generator) > 0.5).float()
        else:  # sparse pixels: mostly single-pixel regions
            heatmap = (torch.rand(height, width, generator=generator) > 0.85).float() * 0.5
        if float(heatmap.max()) > 0:
            assert bounding_box(heatmap) == labelled_box(heatmap), (case, h, w, height, width)


def test_bounding_box_regions_are_4_connected_and_ties_go_to_the_first() -> None:
    diagonal = torch.zeros(4, 4)
    diagonal[0, 0] = diagonal[1, 1] = 1.0  # touching by a corner only: two regions of one pixel
    assert bounding_box(diagonal) == (0, 0, 1, 1)
    u_shape = torch.zeros(6, 7)
    u_shape[0:5, 1] = u_shape[0:5, 5] = u_shape[4, 1:6] = 1.0  # two runs per row until they meet at the bottom
    assert bounding_box(u_shape) == (1, 0, 6, 5)
    twins = torch.zeros(5, 9)
    twins[3:5, 0:2] = twins[0:2, 6:8] = 1.0  # equal sizes: the one met first in reading order (top right) wins
    assert bounding_box(twins) == (6, 0, 8, 2)
    assert bounding_box(torch.zeros(3, 5)) is None  # no region, no box: never the whole image
    assert bounding_box(torch.full((3, 5), float("nan"))) is None


def test_peak_is_the_first_maximum_in_reading_order() -> None:
    heatmap = torch.zeros(4, 6)
    heatmap[2, 1] = heatmap[1, 4] = heatmap[3, 0] = 1.0
    assert peak(heatmap) == (4, 1)


class ShiftedHead(nn.Module):
    """fc(GAP(features(x))) + shift: with shift != 0 the logits are no longer Linear(GAP(A)) of the verified head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ShapesNet()
        self.shift = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.shift


def test_a_batch_that_breaks_the_verified_head_falls_back_to_autograd() -> None:
    torch.manual_seed(3)
    model = ShiftedHead().eval()
    inputs = torch.randn(2, 3, 64, 64)
    extractor = CamExtractor(model, (64, 64), ["net.features"])
    extractor(inputs, method="gradcam")
    assert extractor._gap_linear == {"net.features": True}
    model.shift = 1.0
    # A constant shift leaves the gradients unchanged: the autograd maps equal the closed form's.
    reference = CamExtractor(model, (64, 64), ["net.features"])(inputs, method="gradcam").maps
    for _ in range(2):
        result = extractor(inputs, method="gradcam")
        torch.testing.assert_close(result.maps, reference)
    assert extractor._gap_linear == {"net.features": False}
    assert not model.net.features._forward_hooks
    assert torch.is_grad_enabled()


def test_scorecam_on_two_layers_scores_the_plain_model() -> None:
    """Score-CAM's extra forward passes run without our hooks: each layer's map is its single-layer map."""
    torch.manual_seed(4)
    model = ShapesNet().eval()
    inputs = torch.randn(1, 3, 64, 64)
    extractor = CamExtractor(model, (64, 64), scorecam_max_channels=8)
    early, late = "features.3", "features"
    alone = [extractor(inputs, method="scorecam", layers=[name], targets=torch.tensor([1])).maps for name in (early, late)]
    both = extractor(inputs, method="scorecam", layers=[early, late], targets=torch.tensor([1]))
    from camserve.cam import fuse_maps

    torch.testing.assert_close(both.maps, fuse_maps(alone))


def test_repeated_layers_are_taken_once() -> None:
    model = ShapesNet().eval()
    inputs = torch.randn(1, 3, 64, 64)
    extractor = CamExtractor(model, (64, 64))
    twice = extractor(inputs, method="gradcam", layers=["features", "features"])
    assert twice.layers == ("features",)
    torch.testing.assert_close(twice.maps, extractor(inputs, method="gradcam", layers=["features"]).maps)


class ConvThenReLU(nn.Module):
    """Target layer `conv`, then a ReLU (in place or not), GAP and a Linear head."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def in_place_and_plain_twins(seed: int) -> tuple[ConvThenReLU, ConvThenReLU]:
    torch.manual_seed(seed)
    in_place = ConvThenReLU(inplace=True).eval()
    plain = ConvThenReLU(inplace=False).eval()
    plain.load_state_dict(in_place.state_dict())
    return in_place, plain


def test_gradcam_of_a_layer_written_in_place_downstream_by_hand() -> None:
    """The map of what the layer returned, not of what the in-place ReLU after it made of that, on every call."""
    in_place, plain = in_place_and_plain_twins(5)
    inputs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        activations = plain.conv(inputs)
    leaf = activations.clone().requires_grad_(True)
    logits = plain.fc(plain.relu(leaf).mean(dim=(2, 3)))
    targets = logits.argmax(dim=1)
    (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), leaf)
    weights = gradients.mean(dim=(2, 3))
    expected = normalize_maps(torch.einsum("bk,bkhw->bhw", weights, activations).clamp(min=0))
    of_the_relu_output = normalize_maps(torch.einsum("bk,bkhw->bhw", weights, activations.clamp(min=0)).clamp(min=0))
    assert not torch.allclose(expected, of_the_relu_output, atol=1e-3)  # so the test can tell the two apart

    extractor = CamExtractor(in_place, (16, 16), ["conv"])
    for _ in range(3):
        result = extractor(inputs, method="gradcam")
        torch.testing.assert_close(result.maps[:, 0], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.logits, logits.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "eigencam"])
def test_maps_of_a_layer_written_in_place_equal_those_of_its_out_of_place_twin(method: str) -> None:
    in_place, plain = in_place_and_plain_twins(6)
    inputs = torch.randn(2, 3, 16, 16)
    expected = CamExtractor(plain, (16, 16), ["conv"])(inputs, method=method).maps
    extractor = CamExtractor(in_place, (16, 16), ["conv"])
    for _ in range(3):
        torch.testing.assert_close(extractor(inputs, method=method).maps, expected, atol=1e-5, rtol=1e-4)
    assert not in_place.conv._forward_hooks
    assert torch.is_grad_enabled()


def test_cam_is_refused_where_the_head_sees_the_layer_only_through_an_in_place_relu() -> None:
    """The logits are Linear(GAP(ReLU(A))): verified on the ReLU's output written over A, `cam` would pass."""
    in_place, _ = in_place_and_plain_twins(7)
    extractor = CamExtractor(in_place, (16, 16), ["conv"])
    for _ in range(2):
        with pytest.raises(MethodError, match="gradcam"):
            extractor(torch.randn(2, 3, 16, 16), method="cam")
