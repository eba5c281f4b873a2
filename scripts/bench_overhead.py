"""What a map costs over a plain prediction, measured side by side in one run (in-process, no server).

    make bench-maps                                        # shapes, resnet18, imagenet: cam and gradcam, batch 1 and 8
    python scripts/bench_overhead.py --models resnet18,resnet50,mobilenet_v3_large,efficientnet_b0,convnext_tiny,vit_b_16 \
        --methods cam,gradcam,gradcampp,xgradcam,hirescam,layercam,eigencam,scorecam --references

For each model and batch size, rounds alternate between predict-only (forward under inference_mode) and each
variant, so drifting machine load hits all of them alike; the figure is the median over rounds of
variant time / predict time in the same round. `--references` adds pytorch-grad-cam's and torchcam's
implementation of the same method on the same inputs. Torchvision models are randomly initialised (no weights
can be downloaded here): speed does not depend on the weights' values. `imagenet` is the served pretrained
EfficientNet-Lite0, loaded from model_store/imagenet.mar.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from camserve.cam import CamExtractor, MethodError, to_grid
from camserve.model_spec import ModelSpec, build_architecture, load_model

ROOT = Path(__file__).resolve().parent.parent


def default_model() -> tuple[torch.nn.Module, tuple[int, int]]:
    spec = ModelSpec.from_dict(yaml.safe_load((ROOT / "models/shapes/model-config.yaml").read_text())["handler"])
    return load_model(spec, ROOT / "models" / "shapes"), spec.input_size


def imagenet_model() -> tuple[torch.nn.Module, tuple[int, int]]:
    from camserve_tools.archive import load_archive

    model, spec, _ = load_archive(ROOT / "model_store" / "imagenet.mar")
    return model.requires_grad_(True), spec.input_size  # as the torchvision models: the references back-propagate


def torchvision_model(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    size = (299, 299) if name == "inception_v3" else (224, 224)
    # Parameters keep requires_grad: the reference libraries back-propagate through them (we never need it).
    model = build_architecture(f"torchvision:{name}", 1000).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    if not head.weight.any():  # ViT zero-initialises its head: no gradient would reach any layer
        torch.nn.init.normal_(head.weight, std=0.02)
    return model, size


def _reference(library: str, method: str, model: torch.nn.Module, layer: str) -> Callable[[torch.Tensor], object] | None:
    """The same method from pytorch-grad-cam or torchcam, or None where that library lacks it."""
    module = model.get_submodule(layer)
    if library == "pytorch-grad-cam":
        import pytorch_grad_cam as pgc

        classes = {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM, "hirescam": pgc.HiResCAM,
                   "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "scorecam": pgc.ScoreCAM}
        if method not in classes:
            return None
        cam = classes[method](model=model, target_layers=[module], reshape_transform=to_grid)
        if method == "scorecam":
            cam.batch_size = 32
        return lambda x: cam(input_tensor=x)
    from torchcam import methods as tc

    classes = {"cam": tc.CAM, "gradcam": tc.GradCAM, "gradcampp": tc.GradCAMpp, "xgradcam": tc.XGradCAM, "layercam": tc.LayerCAM, "scorecam": tc.ScoreCAM}
    if method not in classes:
        return None

    def run(x: torch.Tensor) -> object:
        # torchcam needs grads on the model's parameters path and its hooks live as long as the extractor.
        with classes[method](model, target_layer=layer) as extractor, torch.set_grad_enabled(method != "cam" and method != "scorecam"):
            scores = model(x)
            return extractor(scores.argmax(dim=1).tolist(), scores)

    return run


def bench(model_name: str, methods: list[str], batch_sizes: list[int], rounds: int, references: bool) -> list[dict]:
    loaders = {"shapes": default_model, "imagenet": imagenet_model}
    model, size = loaders[model_name]() if model_name in loaders else torchvision_model(model_name)
    extractor = CamExtractor(model, size)
    layer = extractor.default_layers[0]
    rows = []
    for batch in batch_sizes:
        inputs = torch.randn(batch, 3, *size)
        variants: dict[str, Callable[[torch.Tensor], object]] = {}
        for method in methods:
            try:
                extractor(inputs[:1], method=method)
            except MethodError:
                continue  # e.g. cam on a head that is not GAP + Linear
            variants[f"camserve {method}"] = lambda x, m=method: extractor(x, method=m)
            if references:
                for library in ("pytorch-grad-cam", "torchcam"):
                    ref = _reference(library, method, model, layer)
                    try:
                        if ref is not None:
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                ref(inputs[:1])
                    except Exception as error:  # noqa: BLE001 - e.g. torchcam on transformer tokens
                        print(f"{model_name}: {library} {method} does not run here ({type(error).__name__}); left out", flush=True)
                        continue
                    if ref is not None:
                        variants[f"{library} {method}"] = ref
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(rounds + 1):
            for name, variant in variants.items():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes,resnet18,imagenet")
    parser.add_argument("--methods", default="cam,gradcam")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--references", action="store_true", help="also time pytorch-grad-cam and torchcam")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for model_name in args.models.split(","):
        rows += bench(model_name, args.methods.split(","), [int(b) for b in args.batch_sizes.split(",")], args.rounds, args.references)
    table = ["| model | target layer | batch | variant | time ÷ predict-only |", "|---|---|---|---|---|"]
    table += [f"| {r['model']} | `{r['layer']}` | {r['batch']} | {r['variant']} | {r['ratio']:.3f} |" for r in rows]
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
