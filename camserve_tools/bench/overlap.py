"""Can one answer's encoding overlap the next forward pass in the same worker? Sequential vs a one-thread pipeline.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.overlap                  # on the cores this process may use
    taskset -c 0 env PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.overlap # on one core, as each of 2 workers has

A worker answers a stream of requests: forward pass (the default model's Grad-CAM, batch 1, one torch thread),
then the map answer (cam_json at the given image size). Sequential does one after the other; pipelined hands
each answer to a single background thread while the main thread runs the next forward pass. OpenCV, zlib-ng,
numpy's large array operations and torch's kernels release the GIL, so the two can run at once where a second
core is free. Rounds alternate the two ways; the figure is the median time per request.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from camserve.cam import CamExtractor
from camserve.model_spec import ModelSpec, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.responses import cam_json, json_bytes
from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1280x960", help="original image size of every answer")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.split("x"))
    size = (width, height)
    spec = ModelSpec.from_model_dir(ROOT / "models" / "shapes")
    extractor = CamExtractor(load_model(spec, ROOT / "models" / "shapes"), spec.input_size)
    transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
    inputs = [transform(make_scene(EVAL_SEED_START + 9_100_000 + i).image)[None] for i in range(8)]

    def forward(index: int) -> torch.Tensor:
        return extractor(inputs[index % len(inputs)], method="gradcam").maps[0, 0]

    def answer(grid: torch.Tensor) -> bytes:
        return json_bytes(cam_json(grid, size, "gradcam", ("features",), 0, ["a"]))

    def sequential() -> None:
        for index in range(args.requests):
            answer(forward(index))

    def pipelined(pool: ThreadPoolExecutor) -> None:
        pending: Future[bytes] | None = None
        for index in range(args.requests):
            grid = forward(index)
            if pending is not None:
                pending.result()
            pending = pool.submit(answer, grid)
        if pending is not None:
            pending.result()

    first_grid = forward(0)
    forward_only = lambda: [forward(i) for i in range(args.requests)]  # noqa: E731
    answer_only = lambda: [answer(first_grid) for _ in range(args.requests)]  # noqa: E731
    times: dict[str, list[float]] = {"forward alone": [], "answer alone": [], "sequential": [], "pipelined": []}
    with ThreadPoolExecutor(max_workers=1) as pool:
        runs = {"forward alone": forward_only, "answer alone": answer_only, "sequential": sequential, "pipelined": lambda: pipelined(pool)}
        for round_ in range(args.rounds + 1):
            order = list(runs.items()) if round_ % 2 else list(runs.items())[::-1]
            for name, run in order:
                start = time.perf_counter()
                run()
                if round_:  # round 0 warms up
                    times[name].append((time.perf_counter() - start) / args.requests * 1e3)
    for name, values in times.items():
        print(f"{name:>14}: {statistics.median(values):.2f} ms per request")
    print(f"pipelined / sequential: x{statistics.median(times['pipelined']) / statistics.median(times['sequential']):.2f}")


if __name__ == "__main__":
    main()
