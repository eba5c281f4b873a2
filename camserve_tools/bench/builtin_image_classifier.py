"""The serving benchmark's baseline: TorchServe's built-in ImageClassifier, given the model's own input recipe.

The built-in resizes to 256 and crops 224 with ImageNet statistics; our handler resizes the whole image to the
model's input size with the model's mean/std (camserve/preprocessing.py). Reading the same keys of the same
model-config.yaml here makes both do the same resize and normalisation, so the benchmark's ratios measure what our
handler and its map add, not two preprocessing recipes. Everything else (decoding, batching, top-5, labels,
Integrated Gradients on /explanations) is the built-in's own code.
"""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class BuiltinImageClassifier(ImageClassifier):
    def initialize(self, context):
        super().initialize(context)
        recipe = context.model_yaml_config["handler"]
        height, width = recipe["input_size"]
        self.image_processing = transforms.Compose(
            [
                transforms.Resize((height, width), antialias=True),
                transforms.ToTensor(),
                transforms.Normalize(recipe["mean"], recipe["std"]),
            ]
        )
