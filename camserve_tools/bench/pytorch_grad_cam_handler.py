"""The serving benchmark's peer: the handler a user would write for a heat map with every prediction, without camserve.

TorchServe's BaseHandler loads the model (the same model file and weights as the built-in baseline's archive),
and pytorch-grad-cam's GradCAM maps the top-1 class of each image of the batch at the layer our handler maps
(`target_layers` in the archive's model-config.yaml, which the benchmark writes). The input recipe is the model's
own, as for our handler and the baseline: the whole image resized to the input size, the model's mean/std. Each
answer is the label, its probability and the map at the image's size as a base64 8-bit grayscale PNG, as ours.

Nothing here is tuned: it is pytorch-grad-cam used as its documentation shows, PIL for decoding, resizing and
PNG, so the benchmark puts beside ours what serving a map costs without it.
"""

import base64
import io

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler


class PytorchGradCamHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        recipe = context.model_yaml_config["handler"]
        self.transform = transforms.Compose(
            [
                transforms.Resize(tuple(recipe["input_size"]), antialias=True),
                transforms.ToTensor(),
                transforms.Normalize(recipe["mean"], recipe["std"]),
            ]
        )
        (layer,) = recipe["target_layers"]
        # GradCAM back-propagates into the model's parameters: they must require grad (BaseHandler leaves them so).
        self.cam = GradCAM(model=self.model, target_layers=[self.model.get_submodule(layer)])

    def preprocess(self, data):
        images = [Image.open(io.BytesIO(row.get("data") or row.get("body"))).convert("RGB") for row in data]
        return [image.size for image in images], torch.stack([self.transform(image) for image in images]).to(self.device)

    def inference(self, data, *args, **kwargs):
        # BaseHandler.inference runs under inference_mode, where nothing can be back-propagated.
        sizes, inputs = data
        with torch.enable_grad():
            maps = self.cam(input_tensor=inputs, targets=None)  # targets None: each image's top-1 class
        return sizes, maps, torch.softmax(self.cam.outputs.detach(), dim=1)

    def postprocess(self, data):
        answers = []
        for size, grayscale, probabilities in zip(*data, strict=True):
            index = int(probabilities.argmax())
            heatmap = Image.fromarray((255 * grayscale).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
            png = io.BytesIO()
            heatmap.save(png, format="PNG")
            answers.append(
                {
                    "index": index,
                    "label": self.mapping[str(index)],
                    "probability": float(probabilities[index]),
                    "heatmap": base64.b64encode(png.getvalue()).decode("ascii"),
                }
            )
        return answers
