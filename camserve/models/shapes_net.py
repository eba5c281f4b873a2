"""ShapesNet: the default model, a small CNN whose head is global average pooling + one Linear layer.

That head is what the CAM paper (Zhou et al. 2016, https://arxiv.org/abs/1512.04150) needs for exact CAM, so
`cam` and `gradcam` both apply to it and agree up to scale.
"""

from __future__ import annotations

import torch
from torch import nn

# Square input it is trained at; the whole image is resized to it (no crop). It is served at 192 px
# (models/shapes/model-config.yaml): measured on validation scenes, the larger input finds small objects that
# 160 px leaves a few pixels wide (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").
TRAINING_SIZE = 160
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ShapesNet(nn.Module):
    """Conv trunk (output stride 8: a 20x20 map at 160 px, 24x24 at 192) -> GAP -> Linear.

    The last two convolutions are dilated instead of strided: they widen the receptive field to cover the
    largest shapes without coarsening the map the CAM is read from. Narrow early layers keep training within
    15 minutes on 2 CPU cores (about 98 M multiply-adds per 160 px image).
    """

    feature_channels = 128

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(3, 16, stride=2),
            _conv_bn_relu(16, 32, stride=2),
            _conv_bn_relu(32, 32),
            _conv_bn_relu(32, 64, stride=2),
            _conv_bn_relu(64, 96, dilation=2),
            _conv_bn_relu(96, 128, dilation=4),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.feature_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))
