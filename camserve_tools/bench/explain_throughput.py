"""Throughput of `camserve explain` against the bare in-process pipeline, on the same images and batch size.

    .venv/bin/python -m camserve_tools.bench.explain_throughput [--images 32] [--batch-size 8] [--jobs N] [--output png] [--repeats 15]

"handler" calls the pipeline (CamPipeline.answer) on batches of image bytes already in memory, asking for what an endpoint answers for
that output (JSON for png and grid; the overlay image for overlay): the floor of any offline run.
"explain" is the command's own code path (camserve_tools.commands.explain.explain_images): files read ahead in
threads, the same pipeline per batch, the JSONL journal and the output images written. Both use one loaded
handler; runs come in adjacent pairs (in turn handler first and explain first), so that load from other processes
hits both sides of a pair alike: the figure is the median of the pairs' ratios (the medians of each side and the
best runs are printed too). Figures: docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from camserve_tools.commands.explain import ExplainSettings, explain_images
from camserve_tools.data.scene_dataset import write_scene_dataset
from camserve_tools.local_model import answer_rows, open_model

ROOT = Path(__file__).resolve().parents[2]


def handler_rate(pipeline, bodies: list[bytes], headers: dict[str, str], batch_size: int) -> tuple[float, float]:
    """(images per wall-clock second, per CPU second) of the bare pipeline, the bytes in memory."""
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(bodies), batch_size):
        batch = bodies[start : start + batch_size]
        answer_rows(pipeline, batch, [headers] * len(batch))
    return len(bodies) / (time.perf_counter() - started), len(bodies) / (time.process_time() - cpu)


def explain_rate(pipeline, name: str, paths: list[Path], settings: ExplainSettings) -> tuple[float, float]:
    """(images per wall-clock second, per CPU second) of the command's code path, into a fresh output folder.

    CPU seconds count every thread of this process; on a machine shared with other work they vary far less
    than wall-clock seconds, so both are reported."""
    with tempfile.TemporaryDirectory(prefix="bench-explain-out-") as out:
        started, cpu = time.perf_counter(), time.process_time()
        summary = explain_images(pipeline, name, paths, Path(out), settings)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    if summary.explained != len(paths) or summary.failed:
        raise RuntimeError(f"explain did not answer every image: {summary}")
    return len(paths) / seconds, len(paths) / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "shapes.mar")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--jobs", type=int, help="default: the command's (0 for png and grid, 2 for overlay)")
    parser.add_argument("--output", choices=("png", "overlay", "grid"), default="png")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = ExplainSettings(output=args.output, batch_size=args.batch_size, jobs=args.jobs)
    with tempfile.TemporaryDirectory(prefix="bench-explain-in-") as data, open_model(args.model) as model:
        paths = write_scene_dataset(Path(data), args.images)
        bodies = [path.read_bytes() for path in paths]
        # The bare handler answers what an endpoint would for this output: JSON for png and grid, the overlay image
        # itself for overlay (explain then also gives the JSON).
        headers = {**settings.request_headers(), **({"X-CAM-Output": "overlay"} if args.output == "overlay" else {})}
        handler_rate(model.pipeline, bodies[: args.batch_size], headers, args.batch_size)  # warm-up
        rates: dict[str, list[tuple[float, float]]] = {"handler": [], "explain": []}
        for repeat in range(args.repeats):
            # Pairs of adjacent runs, in turn handler first and explain first: whatever the order favours cancels out.
            order = ("handler", "explain") if repeat % 2 == 0 else ("explain", "handler")
            for side in order:
                if side == "handler":
                    rates["handler"].append(handler_rate(model.pipeline, bodies, headers, args.batch_size))
                else:
                    rates["explain"].append(explain_rate(model.pipeline, model.name, paths, settings))
    wall = {key: statistics.median(v[0] for v in values) for key, values in rates.items()}
    best = {key: max(v[0] for v in values) for key, values in rates.items()}  # the least disturbed run of each
    cpu = {key: statistics.median(v[1] for v in values) for key, values in rates.items()}
    paired = statistics.median(e[0] / h[0] for h, e in zip(rates["handler"], rates["explain"], strict=True))
    result = {
        "paired_ratio": round(paired, 3),
        "images": args.images,
        "batch_size": args.batch_size,
        "jobs": settings.threads,
        "output": args.output,
        "repeats": args.repeats,
        "handler_images_per_s": round(wall["handler"], 2),
        "explain_images_per_s": round(wall["explain"], 2),
        "ratio": round(wall["explain"] / wall["handler"], 3),
        "best_ratio": round(best["explain"] / best["handler"], 3),
        "handler_images_per_cpu_s": round(cpu["handler"], 2),
        "explain_images_per_cpu_s": round(cpu["explain"], 2),
        "cpu_ratio": round(cpu["explain"] / cpu["handler"], 3),
        "runs_wall": {key: [round(v[0], 2) for v in values] for key, values in rates.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"| path | images/s (median of {args.repeats}) | best run | images per CPU-s (median) | runs, images/s |\n|---|---|---|---|---|")
    for key in ("handler", "explain"):
        print(f"| {key} | {wall[key]:.2f} | {best[key]:.2f} | {cpu[key]:.2f} | {', '.join(f'{v[0]:.1f}' for v in rates[key])} |")
    print(
        f"\nexplain / handler = {paired:.3f} (median of paired runs); {result['ratio']:.3f} (medians), "
        f"{result['best_ratio']:.3f} (best runs), "
        f"{result['cpu_ratio']:.3f} (CPU time)  "
        f"({args.images} scenes, batch {args.batch_size}, jobs {settings.threads}, output {args.output})"
    )


if __name__ == "__main__":
    main()
