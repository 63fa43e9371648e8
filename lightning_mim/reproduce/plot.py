"""`compare.png`: each row's mean top-1 against its mean pre-training wall-clock, one colour per row and one marker per
protocol, error bars of one sample standard deviation over the seeds, both legends outside the axes (no label sits
among the points, so none overlaps another), the preset and the seeds per row in the title. The reference rows: the
row's encoder at random initialisation as a hollow marker under it, the raw pixels as grey horizontal lines."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning_mim.reproduce.plan import Plan
from lightning_mim.reproduce.results import PROTOCOL_NAMES, RowResult
from lightning_mim.reproduce.stats import summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARKERS = "os^Dv"
# After matplotlib's ten: two colours unlike any of them, for up to twelve rows (compare's demo rows).
EXTRA_COLOURS = ("black", "#ffe119")


def seeds_title(rows: list[RowResult]) -> str:
    rows = [row for row in rows if row.run.reference is None] or rows
    counts = sorted({len(row.seeds) for row in rows})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"n = {n} seed{'s' if counts[-1] > 1 else ''} per row"


def compare_figure(plan: Plan, rows: list[RowResult]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = [*plt.get_cmap("tab10").colors, *EXTRA_COLOURS]
    figure, axes = plt.subplots(figsize=(10, 5))
    row_handles, protocol_handles = [], {}
    pretrained = [row for row in rows if row.run.reference is None]
    random_init = {row.run.key.removesuffix("_random_init"): row for row in rows
                   if row.run.reference is not None and row.run.key.endswith("_random_init")}
    protocols = [protocol for protocol in plan.protocols if protocol in PROTOCOL_NAMES]  # clean top-1 on the data
    for index, row in enumerate(pretrained):
        colour = colours[index % len(colours)]
        hours_std = summarize([result.hours for result in row.seeds]).std
        for protocol, marker in zip(protocols, MARKERS):
            summary = row.summary(protocol)
            if summary.mean is None:
                continue
            axes.errorbar(row.hours, summary.mean, yerr=summary.std, xerr=hours_std, fmt=marker, color=colour,
                          markersize=7, capsize=3, elinewidth=1, markeredgecolor="black", markeredgewidth=0.5)
            initial = random_init[row.run.key].summary(protocol) if row.run.key in random_init else None
            if initial is not None and initial.mean is not None:  # the same encoder untrained: a hollow marker
                axes.errorbar(row.hours, initial.mean, yerr=initial.std, fmt=marker, color=colour, markersize=7,
                              capsize=3, elinewidth=1, markerfacecolor="none", markeredgewidth=1.2)
            protocol_handles[protocol] = Line2D([], [], linestyle="", marker=marker, color="grey",
                                                markeredgecolor="black", markeredgewidth=0.5, markersize=7,
                                                label=f"{PROTOCOL_NAMES[protocol]} top-1")
        row_handles.append(Line2D([], [], linestyle="", marker="s", color=colour, markersize=8,
                                  label=f"{row.run.key} (n = {len(row.seeds)})"))
    for row in rows:
        if row.run.reference == "pixels":
            for protocol, style in zip(protocols, ("--", ":", "-.", (0, (1, 3)))):
                summary = row.summary(protocol)
                if summary.mean is not None:
                    axes.axhline(summary.mean, color="grey", linestyle=style, linewidth=1)
                    row_handles.append(Line2D([], [], color="grey", linestyle=style,
                                              label=f"raw pixels, {PROTOCOL_NAMES[protocol]}"))
    if random_init:
        row_handles.append(Line2D([], [], linestyle="", marker="o", color="grey", markerfacecolor="none",
                                  markersize=7, label="hollow: the row's encoder at random init"))
    devices = plan.runs[0].devices
    axes.set_xlabel(f"pre-training wall-clock hours, mean over seeds ({devices} "
                    f"{'GPU' if plan.setup.preset == 'paper' else 'CPU'} process{'es' if devices > 1 else ''})")
    axes.set_ylabel("top-1 (%), mean ± std over seeds")
    axes.set_title(f"compare, PRESET={plan.setup.preset}, {seeds_title(rows)}" +
                   ("" if plan.setup.preset == "paper" else " (not paper numbers)"), fontsize=10)
    axes.margins(x=0.08, y=0.08)
    axes.grid(alpha=0.3)
    protocol_legend = axes.legend(handles=list(protocol_handles.values()), title="protocol (marker)", fontsize=8,
                                  title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.add_artist(protocol_legend)
    axes.legend(handles=row_handles, title="row (colour)", fontsize=8, title_fontsize=8, loc="lower left",
                bbox_to_anchor=(1.01, 0.0))
    figure.tight_layout()
    return figure


def plot_analysis(plan: Plan, rows: list[RowResult]) -> list[Path]:
    """The analyze figures of the table (`eval.analyze.figures`: spectrum, attention distance and entropy), one line
    per pre-trained row at seed 0 and one for the first row's random initialisation, as `<out>/analysis/*.png`;
    none before any run was analysed."""
    import matplotlib.pyplot as plt

    from lightning_mim.eval.analyze import figures, read_analysis
    from lightning_mim.reproduce.presets import ANALYZE_IMAGES

    pretrained = [row for row in rows if row.run.reference is None]
    chosen = pretrained + [row for row in rows if pretrained and row.run.key == f"{pretrained[0].run.key}_random_init"]
    analysed = [(row.run.key, row.seeds[0].run.analysis_dir) for row in chosen]
    analyses = [read_analysis(folder, key) for key, folder in analysed
                if folder is not None and (folder / "analysis.csv").is_file()]
    if not analyses:
        return []
    out = plan.out / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures(analyses, f"{ANALYZE_IMAGES} validation images, seed 0").items():
        paths.append(out / f"{name}.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    return paths


def plot_compare(plan: Plan, rows: list[RowResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = compare_figure(plan, rows)
    figure.savefig(path, dpi=120)
    plt.close(figure)
