"""What the serving benchmark measured, and its report: tables, targets, plots (docs/serving-benchmark.md).

camserve_tools/bench/serving_benchmark.py measures and calls write_report; `serving_benchmark.py --report-from <json>`
writes a report again from a run's data, without measuring.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BASELINE = "built-in plain"  # the variant every ratio divides by: TorchServe's built-in ImageClassifier
PEER = "pytorch-grad-cam"  # the handler a user would write instead of ours: shown beside the targets, not one


@dataclass(frozen=True)
class Settings:
    """TorchServe worker settings, the same for every variant of a run."""

    workers: int
    threads: int  # torch intra-op threads per worker (OMP_NUM_THREADS)
    batch_size: int
    max_batch_delay_ms: int

    @property
    def label(self) -> str:
        """For prose: every setting spelled out."""
        return f"{self.workers} worker(s) x {self.threads} thread(s), batch {self.batch_size}, delay {self.max_batch_delay_ms} ms"

    @property
    def short(self) -> str:
        """For table cells: workers x threads, batch size, delay."""
        return f"{self.workers}×{self.threads}, b{self.batch_size}" + (f", {self.max_batch_delay_ms} ms" if self.batch_size > 1 else "")

    @property
    def slug(self) -> str:
        """For file names: run dirs and archive stores of these settings."""
        return f"w{self.workers}t{self.threads}b{self.batch_size}d{self.max_batch_delay_ms}"


@dataclass
class Cell:
    model: str
    settings: Settings
    variant: str
    users: int
    figures: dict


def figures_of(cells: list[Cell], cell: Cell, variant: str) -> dict | None:
    """`variant`'s figures for the model, settings and users of `cell`."""
    return next(
        (c.figures for c in cells if (c.model, c.settings, c.users, c.variant) == (cell.model, cell.settings, cell.users, variant)),
        None,
    )


def baseline_of(cells: list[Cell], cell: Cell) -> dict | None:
    return figures_of(cells, cell, BASELINE)


def figure(figures: dict | None, key: str) -> float | None:
    """`figures[key]`, or None where there are no figures or no such key."""
    return figures.get(key) if figures else None


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference and value is not None else "-"


def cpu_text(figures: dict, part: str = "server_total") -> str:
    """A cell's CPU ms per request of `part`, or '-' for a run without CPU figures."""
    value = figures.get(f"{part}_cpu_ms")
    return f"{value:.1f}" if value is not None else "-"


def size_text(size: float) -> str:
    return f"{size / 1024:.1f} KiB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.2f} MiB"


def results_table(cells: list[Cell]) -> list[str]:
    lines = [
        "| model | workers×threads, batch | variant | users | req/s | ÷ built-in | p50 ms | p95 ms | p99 ms | p95 ÷ built-in "
        "| server CPU ms/req | ÷ built-in | ÷ none | frontend / workers ms | client CPU ms/req | errors | response |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        f, base, none = cell.figures, baseline_of(cells, cell), figures_of(cells, cell, "none")
        if not f["requests"]:
            lines.append(
                f"| {cell.model} | {cell.settings.short} | {cell.variant} | {cell.users} | no answer within the window |" + " |" * 12
            )
            continue
        error_rate = f["failures"] / f["requests"]
        flag = " (client CPU saturated)" if f["client_cpu_saturated"] else ""
        server = f.get("server_total_cpu_ms")
        split = f"{cpu_text(f, 'server_frontend')} / {cpu_text(f, 'server_workers')}"
        lines.append(
            f"| {cell.model} | {cell.settings.short} | {cell.variant} | {cell.users} | {f['throughput_rps']:.2f} | "
            f"{ratio(f['throughput_rps'], figure(base, 'throughput_rps'))} | {f['p50_ms']:.0f} | {f['p95_ms']:.0f} | {f['p99_ms']:.0f} | "
            f"{ratio(f['p95_ms'], figure(base, 'p95_ms'))} | {cpu_text(f)} | {ratio(server, figure(base, 'server_total_cpu_ms'))} | "
            f"{ratio(server, figure(none, 'server_total_cpu_ms'))} | {split} | "
            f"{cpu_text(f, 'client')} | {error_rate:.1%} ({f['failures']}/{f['requests']}){flag} | {size_text(f['response_bytes'])} |"
        )
    return lines


def saturation_table(cells: list[Cell]) -> list[str]:
    """One row per model and settings: each variant's throughput, p95 and server CPU per request at the highest
    concurrency, and their ratios to the built-in plain prediction's."""
    saturation = max(cell.users for cell in cells)
    variants = list(dict.fromkeys(cell.variant for cell in cells))
    lines = ["| model | workers×threads, batch | " + " | ".join(variants) + " |", "|---|---" + "|---" * len(variants) + "|"]
    for model, settings in dict.fromkeys((cell.model, cell.settings) for cell in cells):
        row = []
        for variant in variants:
            cell = next((c for c in cells if (c.model, c.settings, c.variant, c.users) == (model, settings, variant, saturation)), None)
            if cell is None or not cell.figures["requests"]:
                row.append("no answer")
                continue
            f, base = cell.figures, baseline_of(cells, cell)
            row.append(
                f"{f['throughput_rps']:.1f}/s (×{ratio(f['throughput_rps'], figure(base, 'throughput_rps'))}), "
                f"p95 {f['p95_ms']:.0f} ms (×{ratio(f['p95_ms'], figure(base, 'p95_ms'))}), "
                f"CPU {cpu_text(f)} ms (×{ratio(f.get('server_total_cpu_ms'), figure(base, 'server_total_cpu_ms'))})"
            )
        lines.append(f"| {model} | {settings.short} | " + " | ".join(row) + " |")
    return lines


# Bounds at saturation: (variant, figure, over which variant, comparison, bound, text). Every map variant against
# the built-in plain prediction and against our own `none`, in served throughput and p95 and in the server's CPU
# time per answered request (frontend and workers); a stricter throughput bound for cam. Where throughput and CPU
# disagree, the CPU figure decides: throughput on cores shared with the client also counts the client's work.
SERVER_CPU = "server_total_cpu_ms"
MAP_VARIANTS = ("gradcam", "cam")
TARGETS = (
    *(
        target
        for variant in MAP_VARIANTS
        for target in (
            (variant, SERVER_CPU, BASELINE, "<=", 1.00, f"{variant} server CPU per request ≤ 1.00× built-in plain"),
            (variant, SERVER_CPU, "none", "<=", 1.08, f"{variant} server CPU per request ≤ 1.08× our none"),
            (variant, "throughput_rps", BASELINE, ">=", 0.95, f"{variant} throughput ≥ 0.95× built-in plain"),
            (variant, "throughput_rps", "none", ">=", 0.90, f"{variant} throughput ≥ 0.90× our none"),
            (variant, "p95_ms", BASELINE, "<=", 1.10, f"{variant} p95 ≤ 1.10× built-in plain"),
        )
    ),
    ("cam", "throughput_rps", BASELINE, ">=", 0.98, "cam throughput ≥ 0.98× built-in plain"),
)
# Figures shown beside the targets for comparison, with no bound: (variant, figure, over which variant, text)
REFERENCES = (
    (PEER, "throughput_rps", BASELINE, f"reference: {PEER} throughput ÷ built-in plain"),
    (PEER, "p95_ms", BASELINE, f"reference: {PEER} p95 ÷ built-in plain"),
    ("gradcam", "throughput_rps", PEER, f"reference: gradcam throughput ÷ {PEER}"),
)


def target_lines(cells: list[Cell], forward: dict[tuple[str, Settings], float]) -> list[str]:
    """Each target at saturation (the highest concurrency), per model and batch size."""
    saturation = max(cell.users for cell in cells)
    lines = ["| model | workers×threads, batch | target | measured | verdict |", "|---|---|---|---|---|"]
    for cell in cells:
        if cell.users != saturation:
            continue
        for variant, figure, over, comparison, bound, text in TARGETS:
            other = figures_of(cells, cell, over)
            if cell.variant == variant and other and other.get(figure) and cell.figures.get(figure) is not None:
                value = cell.figures[figure] / other[figure]
                met = value >= bound if comparison == ">=" else value <= bound
                lines.append(f"| {cell.model} | {cell.settings.short} | {text} | {value:.2f} | {'met' if met else '**missed**'} |")
        for variant, figure, over, text in REFERENCES:
            other = figures_of(cells, cell, over)
            if cell.variant == variant and other and other[figure] and cell.figures["requests"]:
                lines.append(f"| {cell.model} | {cell.settings.short} | {text} | {cell.figures[figure] / other[figure]:.2f} | reference |")
        if cell.variant in (BASELINE, "none") and (cell.model, cell.settings) in forward:
            value = cell.figures["throughput_rps"] / forward[(cell.model, cell.settings)]
            lines.append(
                f"| {cell.model} | {cell.settings.short} | {cell.variant} served ≥ 0.85× in-process forward "
                f"({forward[(cell.model, cell.settings)]:.1f} img/s) | {value:.2f} | {'met' if value >= 0.85 else '**missed**'} |"
            )
    return lines


def disagreement_lines(cells: list[Cell]) -> list[str]:
    """At saturation, each map variant's throughput ratio beside its CPU ratios, and why they disagree where they do.

    With server and client on the same cores and both saturated, throughput follows the CPU both spend per
    answer: the estimate (server + client CPU of the built-in) ÷ (server + client CPU of the variant). A gap
    that the server's CPU does not explain is then the client's (bigger answers to receive and parse), or time
    that is no CPU at all (batch delay, queueing, a busy neighbour).
    """
    saturation = max(cell.users for cell in cells)
    lines = [
        "| model | workers×threads, batch | variant | throughput ÷ built-in | server CPU ÷ built-in | client CPU ms/req "
        "(variant / built-in) | estimate from server + client CPU | why they disagree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        base = baseline_of(cells, cell)
        if cell.users != saturation or cell.variant not in MAP_VARIANTS or not base or SERVER_CPU not in cell.figures:
            continue
        f = cell.figures
        if not (f["requests"] and base.get(SERVER_CPU) and base["throughput_rps"]):
            continue
        throughput = f["throughput_rps"] / base["throughput_rps"]
        server = f[SERVER_CPU] / base[SERVER_CPU]
        estimate = (base[SERVER_CPU] + base["client_cpu_ms"]) / (f[SERVER_CPU] + f["client_cpu_ms"])
        client_extra = f["client_cpu_ms"] - base["client_cpu_ms"]
        throughput_met, cpu_met = throughput >= 0.95, server <= 1.00
        if throughput_met == cpu_met:
            why = "they agree"
        elif cpu_met:
            why = "the server spends no more CPU per answer; " + (
                f"the client spends {client_extra:.1f} ms more per answer on the same cores"
                if abs(estimate - throughput) <= 0.05
                else f"{1 - throughput / estimate:.0%} of the gap is no CPU time (batch delay, queueing, a busy neighbour, noise)"
            )
        else:
            why = "the server spends more CPU per answer, but throughput was not bound by it (idle cores, or the run's noise)"
        lines.append(
            f"| {cell.model} | {cell.settings.short} | {cell.variant} | {throughput:.2f} | {server:.2f} | "
            f"{f['client_cpu_ms']:.1f} / {base['client_cpu_ms']:.1f} | {estimate:.2f} | {why} |"
        )
    return lines if len(lines) > 2 else []


def machine() -> str:
    processor = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({processor}), torch {torch.__version__}, Python {platform.python_version()}"


def write_report(
    path: Path,
    title: str,
    command: str,
    cells: list[Cell],
    forward: dict[tuple[str, Settings], float],
    seconds: float,
    profile_lines: list[str],
    measured_at: str | None = None,
    engine_cells: list[Cell] | None = None,
    engine_lines: list[str] | None = None,
) -> None:
    """`path` (Markdown), its plots beside it (not for a sweep of settings), and `path` with .json: every figure,
    from which --report-from writes the same report again."""
    measured_at = measured_at or time.strftime("%Y-%m-%d %H:%M")
    from camserve_tools.bench.report_plots import plot

    plots = plot(cells, path.parent, path.stem) if len({cell.settings.workers for cell in cells}) == 1 else []
    profile_block = (
        [
            "## Where a request's time goes (in-process, ms per request)",
            "",
            "Both handlers run in-process on the same images, one batch after another (camserve_tools/bench/handler_profile.py), "
            "stage by stage, torch on the workers' threads. At one user and batch 1, the served p50 minus the handler's "
            "total is what TorchServe (HTTP, frontend, worker socket) and the client add; at batch 8 and one user, the "
            "served p50 also holds the batch delay.",
            "",
            *profile_lines,
        ]
        if profile_lines
        else []
    )
    settings = list(dict.fromkeys(cell.settings for cell in cells))
    lines = [
        f"# {title}",
        "",
        f"Generated by `{command}`, measured {measured_at} UTC; do not edit by hand (what the figures mean: docs/performance.md).",
        "",
        f"- Machine: {machine()}. Server and Locust share it.",
        f"- Worker settings: {'; '.join(s.label for s in settings)}.",
        f"- Each cell: {seconds:.0f} s of Locust runs (about 2 s each before the window opens) of N users posting pool "
        f"images back to back (a quarter camera-sized JPEG, the rest "
        f"~280×220 PNG/JPEG scenes), in {cells[0].figures.get('rounds', 1)} round(s) taken in turn with the other variants; "
        "ramp-up dropped, left-over requests drained between runs.",
        "- `÷ built-in`: the variant's figure over TorchServe's built-in ImageClassifier's, same model, batch and users.",
        "- Server CPU ms/req: the CPU time (user + system) of the server's whole process tree (Java frontend, every "
        "worker, anything the frontend runs) over each run's measured window, from /proc, divided by the requests "
        "answered in it (camserve_tools/bench/cpu_accounting.py); the frontend's JIT compiler threads are left "
        "out (a warm-up cost, `server_jit_cpu_ms` in the JSON). Client CPU ms/req: the Locust process's own, over the "
        "same window. The client receives and parses each JSON answer and decodes no image. CPU time is charged to "
        "the process that spends it: unlike throughput, neither the client's share of the cores nor a neighbour's "
        "job moves it much.",
        *(
            [
                f"- `{PEER}`: the handler a user would write instead of ours (camserve_tools/bench/pytorch_grad_cam_handler.py): "
                "pytorch-grad-cam's GradCAM at the same layer, top-1 label and heat map PNG at the image's size; a reference, "
                "not a target."
            ]
            if any(cell.variant == PEER for cell in cells)
            else []
        ),
        "",
        f"## At saturation ({max(cell.users for cell in cells)} users): throughput and p95, × the built-in plain prediction's",
        "",
        *saturation_table(cells),
        "",
        "## Targets at saturation",
        "",
        *target_lines(cells, forward),
        "",
        *(["## Throughput against CPU at saturation", "", *disagreement, ""] if (disagreement := disagreement_lines(cells)) else []),
        "## In-process forward throughput (the model alone, inference_mode, same workers × threads)",
        "",
        "| model | settings | images/s |",
        "|---|---|---|",
        *[f"| {model} | {s.short} | {rate:.1f} |" for (model, s), rate in forward.items()],
        "",
        *profile_block,
        *(engine_lines or []),
        "## All cells",
        "",
        *results_table(cells),
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "title": title,
                "command": command,
                "measured_at": measured_at,
                "seconds": seconds,
                "profile_lines": profile_lines,
                "forward": [{"model": m, "settings": asdict(s), "images_per_s": r} for (m, s), r in forward.items()],
                "cells": [asdict(c) for c in cells],
                "engine_cells": [asdict(c) for c in engine_cells or []],
                "engine_lines": engine_lines or [],
            },
            indent=1,
        )
        + "\n"
    )


def rewrite_report(data_file: Path) -> None:
    """The report and plots again from a run's JSON, without measuring (after a change of layout)."""
    data = json.loads(data_file.read_text())
    forward = {(entry["model"], Settings(**entry["settings"])): entry["images_per_s"] for entry in data["forward"]}
    cells = [cell_of(c) for c in data["cells"]]
    engine_cells = [
        Cell(c["model"], Settings(**c["settings"]), c["variant"], c["users"], c["figures"]) for c in data.get("engine_cells", [])
    ]
    write_report(
        data_file.with_suffix(".md"),
        data["title"],
        data["command"],
        cells,
        forward,
        data["seconds"],
        data["profile_lines"],
        data["measured_at"],
        engine_cells,
        data.get("engine_lines", []),
    )


def cell_of(data: dict) -> Cell:
    """A Cell from its JSON form."""
    return Cell(data["model"], Settings(**data["settings"]), data["variant"], data["users"], data["figures"])
