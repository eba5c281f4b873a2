"""Every form a classifier arrives in (`make archive`): a model file + state dict (TorchServe's convention), timm,
a torch.export program. Each is archived, served by one real TorchServe, and its served map (`output=grid`)
equals pytorch-grad-cam's on the original module. Requests that cannot serve stop at archive time.

Models are tiny and randomly initialised (no weights can be downloaded); their classifier weights are scaled up
so that the maps stand far above pytorch-grad-cam's normalisation epsilon, as in test_reference_libraries.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from support import ROOT, png_bytes, start_server, stopped_after
from torch import nn

from camserve.cam import CamExtractor
from camserve.preprocessing import whole_image_transform
from camserve_tools.archive.forms import ArchiveError, ArchiveRequest, archive

LABELS = {str(i): f"class_{i}" for i in range(7)}

# A model file that imports a helper module shipped with EXTRA_FILES; its class takes no arguments (TorchServe's rule).
BLOCKS_PY = """
from torch import nn


class ConvBlock(nn.Sequential):
    def __init__(self, channels_in, channels_out):
        super().__init__(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU())
"""
MODEL_PY = """
from torch import nn

from tiny_blocks import ConvBlock


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(ConvBlock(3, 8), nn.MaxPool2d(2), ConvBlock(8, 16), nn.MaxPool2d(2), ConvBlock(16, 24))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 7)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
"""


class ExportedNet(nn.Module):
    """Exported with torch.export; its archive carries no Python source."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(nn.Conv2d(12, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU())
        self.head = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def randomised(model: nn.Module) -> nn.Module:
    """Eval mode, non-trivial BatchNorm statistics, a classifier scaled far above the references' epsilon."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(1000)
    return model.eval()


def export(model: nn.Module, side: int, path: Path) -> None:
    example = torch.randn(2, 3, side, side)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, path)


def import_model_file(directory: Path) -> type[nn.Module]:
    sys.path.insert(0, str(directory))
    try:
        import tiny_net

        return tiny_net.TinyNet
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("tiny_net", None)
        sys.modules.pop("tiny_blocks", None)


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory):
    """name -> (original module, input size, mean, std, expected layer), and one TorchServe serving all of them."""
    work = tmp_path_factory.mktemp("model-forms")
    (work / "labels.json").write_text(json.dumps(LABELS))
    sources = work / "sources"
    sources.mkdir()
    (sources / "tiny_net.py").write_text(textwrap.dedent(MODEL_PY))
    (sources / "tiny_blocks.py").write_text(textwrap.dedent(BLOCKS_PY))
    store = work / "store"
    originals = {}

    torch.manual_seed(0)
    tiny = randomised(import_model_file(sources)())
    torch.save(tiny.state_dict(), work / "tiny.pth")
    archive(
        ArchiveRequest(
            model_file=sources / "tiny_net.py",
            weights=str(work / "tiny.pth"),
            extra_files=(sources / "tiny_blocks.py",),
            labels=work / "labels.json",
            name="modelfile",
            input_size=(64, 64),
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
        ),
        store,
    )
    originals["modelfile"] = (tiny, (64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "features")

    import timm

    torch.manual_seed(0)
    efficientnet = randomised(timm.create_model("test_efficientnet", pretrained=False, num_classes=len(LABELS)))
    torch.save(efficientnet.state_dict(), work / "timm.pth")
    archive(
        ArchiveRequest(
            model="timm:test_efficientnet", weights=str(work / "timm.pth"), labels=work / "labels.json", name="timm", input_size=(96, 96)
        ),
        store,
    )
    originals["timm"] = (efficientnet, (96, 96), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bn2")  # timm's defaults for it

    torch.manual_seed(0)
    exported = randomised(ExportedNet())
    export(exported, 48, work / "exported.pt2")
    archive(ArchiveRequest(exported=work / "exported.pt2", labels=work / "labels.json", name="exported"), store)
    originals["exported"] = (exported, (48, 48), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "blocks")

    with stopped_after(start_server(work / "server", {name: store / f"{name}.mar" for name in originals})) as server:
        yield originals, server


def reference_gradcam(model: nn.Module, layer: str, inputs: torch.Tensor, target: int, size: tuple[int, int]) -> np.ndarray:
    model = model.requires_grad_(True)
    reference = GradCAM(model=model, target_layers=[model.get_submodule(layer)])
    reference.get_target_width_height = lambda _: (size[1], size[0])  # compare at the layer's own resolution
    return reference(input_tensor=inputs, targets=[ClassifierOutputTarget(target)])[0]


@pytest.mark.server
@pytest.mark.parametrize("name", ["modelfile", "timm", "exported"])
def test_served_map_equals_pytorch_grad_cam_on_the_original_module(forms, scenes, name: str) -> None:
    originals, server = forms
    model, input_size, mean, std, layer = originals[name]
    image = scenes[3].image
    response = requests.post(
        f"{server.inference_url}/predictions/{name}",
        data=png_bytes(image),
        headers={"X-CAM-Output": "grid", "X-CAM-Method": "gradcam"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    cam = response.json()["cam"]
    assert cam["layer"] == layer
    assert cam["label"] == LABELS[str(cam["index"])]
    served = np.array(cam["grid"])
    inputs = whole_image_transform(input_size, mean, std)(image)[None]
    theirs = reference_gradcam(model, layer, inputs, cam["index"], served.shape)
    assert served.max() == pytest.approx(1.0, abs=1e-4)  # a real map, not a constant one
    np.testing.assert_allclose(served, theirs, atol=1e-4)


@pytest.mark.server
def test_exported_program_keeps_the_closed_form_cam_head(forms, scenes) -> None:
    """`cam` needs the GAP + Linear head found in the unflattened program, where the Linear is no nn.Linear."""
    _, server = forms
    response = requests.post(
        f"{server.inference_url}/predictions/exported",
        data=png_bytes(scenes[4].image),
        headers={"X-CAM-Method": "cam", "X-CAM-Output": "grid"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["cam"]["method"] == "cam"


# -- the lean path on an unflattened program, in-process ------------------------------------------------------


class FlattenHeadNet(nn.Module):
    """A head that is not GAP + Linear (flatten + Linear): Grad-CAM must run autograd, from the target layer on."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).flatten(1))


def test_unflattened_program_records_no_graph_before_the_target_layer(tmp_path) -> None:
    torch.manual_seed(0)
    original = randomised(FlattenHeadNet())
    export(original, 32, tmp_path / "net.pt2")
    program = torch.export.unflatten(torch.export.load(tmp_path / "net.pt2")).eval().requires_grad_(False)
    extractor = CamExtractor(program, (32, 32))
    assert extractor.default_layers == ("body",)  # module names survive, the target is found as for any model
    grad_modes = {}

    def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
        grad_modes["stem"] = (torch.is_grad_enabled(), output.requires_grad)

    program.get_submodule("stem").register_forward_hook(record)
    inputs = torch.randn(3, 3, 32, 32)  # the export example had batch 2
    ours = extractor(inputs, method="gradcam")
    assert grad_modes["stem"] == (False, False)  # the trunk ran without autograd
    assert not extractor._gap_linear["body"]  # flatten + Linear is not the closed-form head
    for sample in range(3):
        theirs = reference_gradcam(original, "body", inputs[sample : sample + 1], int(ours.targets[sample, 0]), ours.maps.shape[-2:])
        np.testing.assert_allclose(ours.maps[sample, 0].numpy(), theirs, atol=1e-4)


def test_unflattened_program_takes_the_closed_form_head_and_matches_the_original(tmp_path) -> None:
    """GAP + Linear found in the unflattened program (its Linear is an InterpreterModule): Grad-CAM in closed form."""
    torch.manual_seed(0)
    original = randomised(ExportedNet()).requires_grad_(False)
    export(original, 48, tmp_path / "net.pt2")
    program = torch.export.unflatten(torch.export.load(tmp_path / "net.pt2")).eval().requires_grad_(False)
    inputs = torch.randn(5, 3, 48, 48)
    ours, theirs = CamExtractor(program, (48, 48)), CamExtractor(original, (48, 48))
    assert ours.default_layers == theirs.default_layers == ("blocks",)
    for method in ("gradcam", "gradcam", "cam"):  # the second call runs the closed form under inference_mode
        np.testing.assert_allclose(ours(inputs, method=method).maps.numpy(), theirs(inputs, method=method).maps.numpy(), atol=1e-5)
    assert ours._gap_linear == {"blocks": True}


# -- archive-time errors --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("archive-errors")
    (directory / "tiny_net.py").write_text(textwrap.dedent(MODEL_PY))
    (directory / "tiny_blocks.py").write_text(textwrap.dedent(BLOCKS_PY))
    (directory / "two.py").write_text("from torch import nn\nclass A(nn.Module): pass\nclass B(nn.Module): pass\n")
    (directory / "features.py").write_text(
        textwrap.dedent("""
        from torch import nn
        class Features(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
            def forward(self, x):
                return self.conv(x)
    """)
    )
    torch.manual_seed(0)
    torch.save(import_model_file(directory)().state_dict(), directory / "tiny.pth")
    torch.save({"fc.weight": torch.zeros(7, 24)}, directory / "partial.pth")
    (directory / "labels.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(3)}))
    torch.save({f"conv.{k}": v for k, v in nn.Conv2d(3, 4, 3).state_dict().items()}, directory / "features.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated: exactly why it is refused
        torch.jit.save(torch.jit.script(ExportedNet().eval()), directory / "scripted.pt")
    return directory


@pytest.mark.parametrize(
    ("request_of", "message"),
    [
        (
            lambda d: ArchiveRequest(model="timm:test_efficientnet", model_file=d / "tiny_net.py", weights=str(d / "tiny.pth")),
            "give one of MODEL=, MODEL_FILE=, EXPORTED=",
        ),
        (lambda d: ArchiveRequest(class_name="TinyNet", weights=str(d / "tiny.pth")), "CLASS= names the class inside MODEL_FILE="),
        (lambda d: ArchiveRequest(exported=d / "scripted.pt", weights=str(d / "tiny.pth")), "EXPORTED= carries its own weights"),
        (lambda d: ArchiveRequest(model_file=d / "tiny_net.py"), "MODEL_FILE= needs WEIGHTS="),
        (lambda d: ArchiveRequest(model_file=d / "missing.py", weights=str(d / "tiny.pth")), "MODEL_FILE="),
        (
            lambda d: ArchiveRequest(model_file=d / "two.py", weights=str(d / "tiny.pth")),
            "defines 2 nn.Module classes ['A', 'B']: name the model with CLASS=",
        ),
        (
            lambda d: ArchiveRequest(model_file=d / "tiny_net.py", class_name="Nope", weights=str(d / "tiny.pth")),
            "has no nn.Module class 'Nope'",
        ),
        (lambda d: ArchiveRequest(model="timm:no_such_model", weights=str(d / "tiny.pth")), "timm"),
        (lambda d: ArchiveRequest(exported=d / "scripted.pt"), "TorchScript modules take no forward hooks"),
        (lambda d: ArchiveRequest(model_file=d / "tiny_net.py", weights=str(d / "scripted.pt")), "pass EXPORTED=model.pt2"),
        (
            lambda d: ArchiveRequest(model_file=d / "tiny_net.py", weights=str(d / "tiny.pth"), method="gradcam++"),
            "METHOD=gradcam++: unknown",
        ),
    ],
    ids=[
        "two-forms",
        "class-alone",
        "exported-with-weights",
        "no-weights",
        "missing-file",
        "two-classes",
        "no-such-class",
        "unknown-timm",
        "torchscript-exported",
        "torchscript-weights",
        "unknown-method",
    ],
)
def test_bad_requests_stop_before_any_archive(sources: Path, tmp_path, request_of, message: str) -> None:
    with pytest.raises(ArchiveError, match=re.escape(message)) as raised:
        archive(request_of(sources), tmp_path / "store")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def run_build_archive(*arguments: str, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_archive.py"), *arguments, "--export-path", str(store)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.server
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # the state dict misses keys of the class
        ("--model-file {d}/tiny_net.py --extra-files {d}/tiny_blocks.py --weights {d}/partial.pth", "Missing key(s)"),
        # the helper module is not shipped: the unpacked archive cannot import the model file
        ("--model-file {d}/tiny_net.py --weights {d}/tiny.pth", "No module named 'tiny_blocks'"),
        # a feature extractor, not a classifier
        ("--model-file {d}/features.py --weights {d}/features.pth", "not (batch, classes) logits"),
        # labels for another number of classes than the weights have
        (
            "--model-file {d}/tiny_net.py --extra-files {d}/tiny_blocks.py --weights {d}/tiny.pth --labels {d}/labels.json",
            "LABELS has 3 entries (keys 0..2), the model outputs 7 classes",
        ),
    ],
    ids=["state-dict-mismatch", "extra-file-missing", "output-not-logits", "labels-count"],
)
def test_models_that_cannot_serve_fail_at_archive_time_with_one_line(sources: Path, tmp_path, arguments: str, message: str) -> None:
    # `sources` is a pytest temp dir: no white space in its path.
    completed = run_build_archive(*arguments.format(d=sources).split(), store=tmp_path / "store")
    assert completed.returncode != 0
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("make archive: "), completed.stderr
    assert message in lines[0], completed.stderr
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())
