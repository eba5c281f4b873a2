"""Where a served request's time goes: the built-in handler and our pipeline in-process, stage by stage, on the benchmark's images.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.handler_profile --models shapes,resnet18 --methods none,gradcam

The serving benchmark (camserve_tools/bench/serving_benchmark.py) appends this table to its report. Each request is a batch
of --batch-size requests (default 1); the figure is the mean over the image pool (a quarter camera-sized JPEGs), in ms per
request, with torch on `--threads` threads. What the served latency at one user adds on top of a handler's total
is TorchServe's (HTTP, frontend queue, socket to the worker, worker loop) and the client's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from camserve.pipeline import CamPipeline, Row
from camserve_tools.bench.bench_models import importable_model_dir, prepare_models
from camserve_tools.data.image_pool import Sample, image_pool

ROOT = Path(__file__).resolve().parents[2]


class Stopwatch:
    """Milliseconds spent in wrapped callables, summed per stage name."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[stage] += (time.perf_counter() - started) * 1000

        return timed

    def time(self, stage: str, function: Callable[..., Any], *args: Any) -> Any:
        return self.wrap(stage, function)(*args)


# The pipeline's own stage times (camserve.pipeline's Metrics), under the names this table has always used.
PIPELINE_STAGES = {
    "CamDecodeTime": "decode + options",
    "CamResizeTime": "resize + normalise",
    "CamMapTime": "forward (+ map)",
    "CamEncodeTime": "answer (map: upsample, peak, box, PNG)",
}


class StageTimes:
    """A Metrics sink for the pipeline: its stage times, summed per stage."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def add_time(self, name: str, milliseconds: float, dimensions: Any) -> None:
        if name in PIPELINE_STAGES:
            self.totals[PIPELINE_STAGES[name]] += milliseconds

    def add_count(self, name: str, dimensions: Any) -> None:
        return None


def builtin_handler(model_dir: Path, model_file: Path) -> Any:
    """The benchmark's baseline handler on a model dir laid out as its archive is, initialised as a worker does."""
    import shutil
    import tempfile

    from camserve_tools.bench.builtin_image_classifier import BuiltinImageClassifier

    staging = Path(tempfile.mkdtemp(prefix="camserve-profile-"))
    for path in (*model_dir.iterdir(), model_file):
        shutil.copy2(path, staging / path.name)
    weights = next(p.name for p in model_dir.iterdir() if p.suffix in (".pt", ".pth"))
    # TorchServe's own test context for its own handler: the baseline runs exactly as TorchServe's tests run it.
    context = MockContext(
        model_pt_file=weights,
        model_dir=str(staging),
        model_file=model_file.name,
        gpu_id=None,
        model_name="builtin",
        model_yaml_config_file="model-config.yaml",
    )
    sys.path.insert(0, str(staging))  # a TorchServe worker imports the model file from the model dir
    handler = BuiltinImageClassifier()
    handler.initialize(context)
    return handler


def ours_pipeline(model_dir: Path, stages: StageTimes) -> CamPipeline:
    with importable_model_dir(model_dir):
        return CamPipeline.from_model_dir(model_dir, metrics=stages)


def batches(samples: tuple[Sample, ...], batch_size: int) -> list[tuple[Sample, ...]]:
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def profile_builtin(handler: Any, samples: tuple[Sample, ...], rounds: int, batch_size: int = 1) -> dict[str, float]:
    watch = Stopwatch()
    for _ in range(rounds):
        for batch in batches(samples, batch_size):
            started = time.perf_counter()
            inputs = watch.time("decode + resize + normalise", handler.preprocess, [{"body": sample.body} for sample in batch])
            with torch.inference_mode():
                logits = watch.time("forward", handler.inference, inputs)
            answers = watch.time("top-k + labels", handler.postprocess, logits)
            for answer in answers:
                watch.time("JSON (worker)", json.dumps, answer)
            watch.totals["total"] += (time.perf_counter() - started) * 1000
    return {stage: value / (rounds * len(samples)) for stage, value in watch.totals.items()}


def profile_ours(
    pipeline: CamPipeline, stages: StageTimes, method: str, samples: tuple[Sample, ...], rounds: int, batch_size: int = 1
) -> dict[str, float]:
    """Our pipeline's stages, timed by the pipeline itself; whatever is left of the total is its own glue."""
    stages.totals.clear()
    watch = Stopwatch()
    for _ in range(rounds):
        for batch in batches(samples, batch_size):
            requests = [
                [Row(fields={"body": sample.body}, headers={"x-cam-method": method, "content-type": sample.content_type})]
                for sample in batch
            ]
            started = time.perf_counter()
            answers = pipeline.answer(requests)
            for (answer,) in answers:
                watch.time("JSON (worker)", answer.to_bytes)
            watch.totals["total"] += (time.perf_counter() - started) * 1000
    totals = {**stages.totals, **watch.totals}
    per_request = {stage: value / (rounds * len(samples)) for stage, value in totals.items()}
    per_request["pipeline glue"] = per_request["total"] - sum(v for k, v in per_request.items() if k != "total")
    return per_request


def profile(
    model_name: str,
    model_dir: Path,
    model_file: Path,
    methods: list[str],
    threads: int,
    batch_size: int = 1,
    pool_size: int = 32,
    rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """{variant: {stage: ms per request}} for the built-in and our handler with each method."""
    torch.set_num_threads(threads)
    samples = image_pool(pool_size)
    builtin = builtin_handler(model_dir, model_file)
    stages = StageTimes()
    ours = ours_pipeline(model_dir, stages)
    profile_builtin(builtin, samples[:8], 1, batch_size)  # warm-up: first calls allocate
    results = {"built-in plain": profile_builtin(builtin, samples, rounds, batch_size)}
    for method in methods:
        profile_ours(ours, stages, method, samples[:8], 1, batch_size)
        results[method] = profile_ours(ours, stages, method, samples, rounds, batch_size)
    return results


def profile_table(model_name: str, results: dict[str, dict[str, float]]) -> list[str]:
    stages = list(dict.fromkeys(stage for figures in results.values() for stage in figures if stage != "total"))
    variants = list(results)
    lines = [f"| {model_name}: ms per request | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for stage in [*stages, "total"]:
        cells = [f"{results[v][stage]:.2f}" if stage in results[v] else "" for v in variants]
        name = f"**{stage}**" if stage == "total" else stage
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes,resnet18")
    parser.add_argument("--methods", default="none,cam,gradcam,eigencam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    work_dir = ROOT / ".run" / "profile"
    work_dir.mkdir(parents=True, exist_ok=True)
    for model in prepare_models(args.models.split(","), work_dir):
        results = profile(
            model.name, model.model_dir, model.model_file, args.methods.split(","), args.threads, args.batch_size, rounds=args.rounds
        )
        print("\n".join(profile_table(f"{model.name}, batch {args.batch_size}", results)) + "\n")


if __name__ == "__main__":
    main()
