"""Archive-time check, run on an unpacked archive exactly as a TorchServe worker would see it.

    python camserve_tools/probe_model.py <unpacked archive dir>

Only the archive's own files are importable (its directory first on sys.path, PYTHONPATH empty, cwd there),
so a model file that imports something the archive lacks fails here and not in a worker. Builds the model from
model-config.yaml, loads its weights, runs dummy forwards at two batch sizes, finds the target layer(s) and
computes the default method's map. Prints one JSON line: {"num_classes", "layers"} or {"error": "<one line>"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{type(error).__name__}: {text}"[:600]


def probe(root: Path) -> dict:
    import torch

    from camserve.cam import CamExtractor
    from camserve.model_spec import EXPORTED, ModelSpec, load_model

    spec = ModelSpec.from_model_dir(root)
    try:
        model = load_model(spec, root)
    except Exception as error:  # noqa: BLE001 - any failure to build or load is reported, one line
        return {"error": f"cannot build the model and load its weights: {one_line(error)}"}
    num_classes = None
    for batch in (2, 1):
        inputs = torch.randn(batch, 3, *spec.input_size)
        try:
            with torch.inference_mode():
                output = model(inputs)
        except Exception as error:  # noqa: BLE001
            hint = ""
            if spec.architecture == EXPORTED:
                hint = (
                    " (an exported program accepts only the shapes it was exported for: export with a dynamic batch "
                    "dimension, dynamic_shapes={'x': {0: torch.export.Dim('batch')}}, and give INPUT_SIZE= as exported)"
                )
            return {"error": f"a forward pass on a {tuple(inputs.shape)} input fails{hint}: {one_line(error)}"}
        if not isinstance(output, torch.Tensor):
            return {"error": f"the model returns {type(output).__name__}, not a (batch, classes) tensor of logits"}
        if output.dim() != 2 or output.shape[0] != batch or output.shape[1] < 2:
            return {"error": f"the model's output for a batch of {batch} has shape {tuple(output.shape)}, not (batch, classes) logits"}
        if num_classes not in (None, output.shape[1]):
            return {"error": f"the model gives {num_classes} classes at batch 2 and {output.shape[1]} at batch 1"}
        num_classes = int(output.shape[1])
    try:
        extractor = CamExtractor(model, spec.input_size, spec.target_layers or None, spec.scorecam_max_channels)
        for method in dict.fromkeys((spec.method, "gradcam")):
            maps = extractor(torch.randn(1, 3, *spec.input_size), method=method).maps
            if not torch.isfinite(maps).all():
                return {"error": f"method {method!r} gives non-finite maps at layer(s) {list(extractor.default_layers)}"}
    except Exception as error:  # noqa: BLE001 - LayerError, MethodError, a hook that cannot run...
        return {"error": f"no class activation map from this model: {one_line(error)}"}
    return {"num_classes": num_classes, "layers": list(extractor.default_layers)}


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    # As in a worker: the archive first, nothing of the repository (this script's own folder included).
    sys.path[:] = [str(root)] + [p for p in sys.path[1:] if p and Path(p).resolve() != Path(__file__).resolve().parent.parent]
    try:
        result = probe(root)
    except Exception as error:  # noqa: BLE001
        result = {"error": one_line(error)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
