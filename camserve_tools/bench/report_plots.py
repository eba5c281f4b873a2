"""The serving benchmark's plots: throughput against concurrency, and latency percentiles at saturation."""

from __future__ import annotations

from pathlib import Path

from camserve_tools.bench.benchmark_report import Cell


def plot(cells: list[Cell], out_dir: Path, stem: str) -> list[Path]:
    """Throughput against users per model and settings, and the percentiles at saturation: two PNGs beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = list(dict.fromkeys((cell.model, cell.settings) for cell in cells))
    variants = list(dict.fromkeys(cell.variant for cell in cells))
    saturation = max(cell.users for cell in cells)
    throughput_png, latency_png = out_dir / f"{stem}-throughput.png", out_dir / f"{stem}-latency.png"

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (model, batch) in zip(axes[0], panels, strict=True):
        for variant in variants:
            points = sorted(
                (c.users, c.figures["throughput_rps"]) for c in cells if (c.model, c.settings, c.variant) == (model, batch, variant)
            )
            axis.plot(*zip(*points, strict=True), marker="o", label=variant)
        axis.set(title=f"{model}, {batch.short}", xlabel="concurrent users", ylabel="requests / s", xscale="log", yscale="log")
        axis.set_xticks(sorted({c.users for c in cells}), labels=[str(u) for u in sorted({c.users for c in cells})])
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Served throughput vs concurrency (same server, same worker settings)")
    figure.tight_layout()
    figure.savefig(throughput_png, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    width = 0.27
    for axis, (model, batch) in zip(axes[0], panels, strict=True):
        shown = [v for v in variants if any((c.model, c.settings, c.variant, c.users) == (model, batch, v, saturation) for c in cells)]
        for offset, key in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            values = [
                next(c.figures[key] for c in cells if (c.model, c.settings, c.variant, c.users) == (model, batch, v, saturation))
                for v in shown
            ]
            axis.bar([i + (offset - 1) * width for i in range(len(shown))], values, width, label=key.removesuffix("_ms"))
        axis.set_xticks(range(len(shown)), labels=shown, rotation=35, ha="right", fontsize=7)
        axis.set(title=f"{model}, {batch.short}, {saturation} users", ylabel="latency, ms", yscale="log")
        axis.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Latency percentiles at saturation")
    figure.tight_layout()
    figure.savefig(latency_png, dpi=110)
    plt.close(figure)
    return [throughput_png, latency_png]
