"""What a map costs over a plain prediction, in time and in peak memory, against the reference libraries (in-process).

    make bench-maps     # = camserve_tools/bench/map_overhead.py --references --memory: shapes, resnet50 and imagenet, cam and gradcam,
                        #   batch 1 and 8, against pytorch-grad-cam, torchcam and Captum (about 40 minutes on 2 cores)
    python -m camserve_tools.bench.map_overhead --models resnet18,resnet50,mobilenet_v3_large,efficientnet_b0,convnext_tiny,vit_b_16 \
        --methods cam,gradcam,gradcampp,xgradcam,hirescam,layercam,eigencam,scorecam --references

Time: for each model and batch size, rounds alternate between predict-only (forward under inference_mode) and
each variant, so drifting machine load hits all of them alike; the figure is the median over rounds of variant
time / predict time in the same round. torch runs on one thread (--threads).

Peak memory (--memory): each variant runs in a fresh process, which loads the model, warms the variant up once
(lazy initialisations: oneDNN, autograd, hooks), returns freed memory to the OS (malloc_trim), resets the
kernel's peak-RSS mark (VmHWM, via /proc/self/clear_refs) and then runs one call. Its peak memory is VmHWM minus
the RSS just before the call: everything the call held at its busiest moment - activations, autograd graph,
gradients, library buffers - as the operating system counts it, whichever allocator made it. Median of three
calls, then the median over three such processes (they differ by up to a fifth: oneDNN picks its kernels and
buffers per process); the figure is that peak ÷ the plain prediction's, measured the same way.

`--references` adds pytorch-grad-cam's, torchcam's and Captum's (LayerGradCam, Grad-CAM only) implementation of
the same method on the same inputs, each used as its documentation shows: pytorch-grad-cam and torchcam give the
prediction and the map from one forward pass; Captum needs the class first, so its variant is a prediction
followed by `attribute` (a second forward with backward), which is what serving a prediction with Captum costs.
Torchvision models are randomly initialised (no weights can be downloaded here): speed and memory do not depend on
the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from camserve.cam import CamExtractor, MethodError, to_grid
from camserve.model_spec import ModelSpec, build_architecture, load_model

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("pytorch-grad-cam", "torchcam", "captum")


def default_model() -> tuple[torch.nn.Module, tuple[int, int]]:
    spec = ModelSpec.from_model_dir(ROOT / "models" / "shapes")
    return load_model(spec, ROOT / "models" / "shapes"), spec.input_size


def torchvision_model(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    size = (299, 299) if name == "inception_v3" else (224, 224)
    # Parameters keep requires_grad: the reference libraries back-propagate through them (we never need it).
    model = build_architecture(f"torchvision:{name}", 1000).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    if not head.weight.any():  # ViT zero-initialises its head: no gradient would reach any layer
        torch.nn.init.normal_(head.weight, std=0.02)
    return model, size


def imagenet_model() -> tuple[torch.nn.Module, tuple[int, int]]:
    """The served pretrained EfficientNet-Lite0, loaded from model_store/imagenet.mar."""
    from camserve_tools.archive.packing import load_archive

    model, spec, _ = load_archive(ROOT / "model_store" / "imagenet.mar")
    return model.requires_grad_(True), spec.input_size  # as the torchvision models: the references back-propagate


def build(model_name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    loaders = {"shapes": default_model, "imagenet": imagenet_model}
    return loaders[model_name]() if model_name in loaders else torchvision_model(model_name)


# Our method -> its class in pytorch-grad-cam and in torchcam (None: that library lacks it).
REFERENCE_CLASSES: dict[str, tuple[str | None, str | None]] = {
    "cam": (None, "CAM"),
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "xgradcam": ("XGradCAM", "XGradCAM"),
    "hirescam": ("HiResCAM", None),
    "layercam": ("LayerCAM", "LayerCAM"),
    "eigencam": ("EigenCAM", None),
    "scorecam": ("ScoreCAM", "ScoreCAM"),
}


def _reference(library: str, method: str, model: torch.nn.Module, layer: str) -> Callable[[torch.Tensor], object] | None:
    """The same method from a reference library, or None where that library lacks it."""
    module = model.get_submodule(layer)
    model.requires_grad_(True)  # they back-propagate into the parameters' graph (load_model freezes ours)
    if library == "pytorch-grad-cam":
        import pytorch_grad_cam as pgc

        class_name = REFERENCE_CLASSES.get(method, (None, None))[0]
        if class_name is None:
            return None
        cam = getattr(pgc, class_name)(model=model, target_layers=[module], reshape_transform=to_grid)
        if method == "scorecam":
            cam.batch_size = 32
        return lambda x: cam(input_tensor=x, targets=None)  # 1.5.7: targets is required; None = each top class
    if library == "captum":
        if method != "gradcam":
            return None
        from captum.attr import LayerGradCam

        explainer = LayerGradCam(model, module)

        def predict_then_attribute(x: torch.Tensor) -> object:
            with torch.no_grad():
                classes = model(x).argmax(dim=1)
            return explainer.attribute(x, target=classes, relu_attributions=True)

        return predict_then_attribute
    from torchcam import methods as tc

    torchcam_name = REFERENCE_CLASSES.get(method, (None, None))[1]
    if torchcam_name is None:
        return None
    torchcam_class = getattr(tc, torchcam_name)

    def run(x: torch.Tensor) -> object:
        # torchcam needs grads on the model's parameters path and its hooks live as long as the extractor.
        with torchcam_class(model, target_layer=layer) as extractor, torch.set_grad_enabled(method != "cam" and method != "scorecam"):
            scores = model(x)
            return extractor(scores.argmax(dim=1).tolist(), scores)

    return run


def variants(
    model: torch.nn.Module, extractor: CamExtractor, methods: list[str], references: bool, sample: torch.Tensor, model_name: str
) -> dict[str, Callable[[torch.Tensor], object]]:
    """Name -> callable for every method that applies, ours and (with `references`) the libraries'."""
    layer = extractor.default_layers[0]
    found: dict[str, Callable[[torch.Tensor], object]] = {}
    for method in methods:
        try:
            extractor(sample, method=method)
        except MethodError:
            continue  # e.g. cam on a head that is not GAP + Linear
        found[f"camserve {method}"] = functools.partial(extractor, method=method)
        for library in LIBRARIES if references else ():
            # Each on its own copy of the model: pytorch-grad-cam's hooks stay registered while its object lives,
            # and would otherwise run (and store activations) in every other variant's forward pass.
            reference = _reference(library, method, copy.deepcopy(model), layer)
            if reference is None:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reference(sample)
            except Exception as error:  # noqa: BLE001 - e.g. torchcam on transformer tokens
                print(f"{model_name}: {library} {method} does not run here ({type(error).__name__}); left out", flush=True)
                continue
            found[f"{library} {method}"] = reference
    return found


def bench(model_name: str, methods: list[str], batch_sizes: list[int], rounds: int, references: bool) -> list[dict]:
    model, size = build(model_name)
    extractor = CamExtractor(model, size)
    layer = extractor.default_layers[0]
    rows = []
    for batch in batch_sizes:
        inputs = torch.randn(batch, 3, *size)
        named = variants(model, extractor, methods, references, inputs[:1], model_name)
        timings: dict[str, list[float]] = {name: [] for name in named}
        for round_index in range(rounds + 1):
            for name, variant in named.items():
                start = time.perf_counter()
                extractor.predict(inputs)
                predict_time = time.perf_counter() - start
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    variant(inputs)
                if round_index:  # round 0 warms up
                    timings[name].append((time.perf_counter() - start) / predict_time)
        for name, ratios in timings.items():
            rows.append({"model": model_name, "layer": layer, "batch": batch, "variant": name, "ratio": statistics.median(ratios)})
            print(f"{model_name:>20} {layer:>28} batch {batch}  {name:<28} x{statistics.median(ratios):.3f}", flush=True)
    return rows


# --- peak memory, one fresh process per variant ---


# Every allocation its own mapping, returned to the kernel when freed: RSS then follows the bytes alive, to the
# page, instead of what glibc's heap happens to keep. Slower, but these processes measure memory, not time.
MEMORY_CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def _status_kib(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1))


def _peak_of_call(call: Callable[[], object]) -> int:
    """Bytes above the RSS before the call that the call held at its peak (VmHWM after a reset)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) * 1024


def memory_child(model_name: str, variant: str, batch: int) -> None:
    """Runs in its own process: prints the variant's peak bytes (median of three calls) as JSON."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, size = build(model_name)
    extractor = CamExtractor(model, size)
    inputs = torch.randn(batch, 3, *size)
    library, _, method = variant.partition(" ")
    if variant == "predict":
        call: Callable[[torch.Tensor], object] = extractor.predict
    elif library == "camserve":
        call = functools.partial(extractor, method=method)
    else:  # only this variant's hooks on the model
        reference = _reference(library, method, model, extractor.default_layers[0])
        if reference is None:
            raise ValueError(f"{library} has no {method}")
        call = reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(inputs)  # lazy initialisations happen here, not in the measured calls
        peaks = [_peak_of_call(lambda: call(inputs)) for _ in range(3)]
    print(json.dumps({"peak": statistics.median(peaks)}))


def memory(model_name: str, methods: list[str], batch_sizes: list[int], references: bool, processes: int) -> list[dict]:
    model, size = build(model_name)
    extractor = CamExtractor(model, size)
    names = list(variants(model, extractor, methods, references, torch.randn(1, 3, *size), model_name))
    del model, extractor
    rows = []
    for batch in batch_sizes:
        peaks = {}
        for name in ["predict", *names]:
            # Processes differ by up to a fifth (which kernels and buffers oneDNN picks): median of `processes`.
            command = [sys.executable, "-m", "camserve_tools.bench.map_overhead", "--memory-child", json.dumps([model_name, name, batch])]
            results = [
                subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=MEMORY_CHILD_ENV)
                for _ in range(processes)
            ]
            peaks[name] = statistics.median(json.loads(r.stdout.strip().splitlines()[-1])["peak"] for r in results)
        for name in names:
            rows.append(
                {
                    "model": model_name,
                    "batch": batch,
                    "variant": name,
                    "peak_mib": peaks[name] / 2**20,
                    "predict_mib": peaks["predict"] / 2**20,
                    "ratio": peaks[name] / peaks["predict"],
                }
            )
            print(
                f"{model_name:>20} batch {batch}  {name:<28} peak {peaks[name] / 2**20:8.1f} MiB"
                f"  (predict {peaks['predict'] / 2**20:.1f} MiB)  x{peaks[name] / peaks['predict']:.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes,resnet50,imagenet")
    parser.add_argument("--methods", default="cam,gradcam")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one TorchServe worker thread)")
    parser.add_argument("--references", action="store_true", help="also run pytorch-grad-cam, torchcam and Captum")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, each variant in a fresh process")
    parser.add_argument("--memory-processes", type=int, default=3, help="processes per variant (median)")
    parser.add_argument("--no-time", action="store_true", help="skip the time rounds")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods, batch_sizes = args.methods.split(","), [int(b) for b in args.batch_sizes.split(",")]
    tables = []
    if not args.no_time:
        rows = []
        for model_name in args.models.split(","):
            rows += bench(model_name, methods, batch_sizes, args.rounds, args.references)
        table = ["| model | target layer | batch | variant | time ÷ predict-only |", "|---|---|---|---|---|"]
        table += [f"| {r['model']} | `{r['layer']}` | {r['batch']} | {r['variant']} | {r['ratio']:.3f} |" for r in rows]
        tables.append("\n".join(table))
    if args.memory:
        rows = []
        for model_name in args.models.split(","):
            rows += memory(model_name, methods, batch_sizes, args.references, args.memory_processes)
        table = ["| model | batch | variant | peak MiB | plain prediction's peak MiB | peak ÷ plain |", "|---|---|---|---|---|---|"]
        table += [
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['peak_mib']:.1f} | {r['predict_mib']:.1f} | {r['ratio']:.2f} |"
            for r in rows
        ]
        tables.append("\n".join(table))
    print("\n\n".join(tables))
    if args.markdown:
        args.markdown.write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
