"""PNG charts with matplotlib (imported lazily, Agg backend).

Every function draws, saves, and returns the data actually on the axes (read back from the
matplotlib artists, not from its inputs), so tests and ``plots.json`` check what was drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from equi.reporting.runs import METRIC_LABELS, CurvePoint, split_label

METRIC_EXPLANATIONS = {
    "safety": "harmful prompts refused or partly refused (%)",
    "over_refusal": "benign prompts refused or partly refused (%)",
    "balanced": "mean of safety and 100 − over-refusal (%)",
}
GROUP_COLOURS = {"EHD": "#d62728", "IHD": "#1f77b4", "MHD": "#9467bd", "ALL": "#2ca02c", "OTHER": "#7f7f7f",
                 "BENIGN": "#ff7f0e", "baseline": "#000000"}


#: Line style and marker per algorithm when the series are per (group, algorithm): colour keeps the group.
ALGO_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _line_styles(series: dict[str, list[CurvePoint]]) -> dict[str, dict[str, Any]]:
    """Colour by group; with more than one algorithm, line style and marker by algorithm."""
    algos = sorted({algo for label in series if (algo := split_label(label)[1]) is not None})
    styles = {}
    for label in series:
        group, algo = split_label(label)
        linestyle, marker = ALGO_STYLES[algos.index(algo) % len(ALGO_STYLES)] if algo is not None else ("-", "o")
        styles[label] = {"color": GROUP_COLOURS.get(group), "linestyle": linestyle, "marker": marker}
    return styles


def _legend_title(series: dict[str, list[CurvePoint]]) -> str:
    return "training group · algorithm" if any(split_label(label)[1] for label in series) else "training group"


class PlottingUnavailable(ImportError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailable("equi report draws with matplotlib: pip install 'equi[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_y(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": "equi report"})


def _literal_legend(ax) -> None:
    """Draw legend entries as typed: series labels come from run files (group names), and matplotlib would read
    ``$...$`` in them as mathtext (a ``$`` that is not valid TeX fails the whole report)."""
    legend = ax.get_legend()
    for text in legend.get_texts() if legend is not None else []:
        text.set_parse_math(False)


def _finish(plt, fig, ax, path: Path, kind: str, **extra: Any) -> dict[str, Any]:
    """Save the figure and return the data behind it (what the report's tests and report.json read)."""
    _literal_legend(ax)
    _save(fig, path)
    series = _lines_of(ax) if kind == "line" else _bars_of(ax)
    data = {"file": path.name, "kind": kind, "title": ax.get_title(), "xlabel": ax.get_xlabel(),
            "ylabel": ax.get_ylabel(), **extra, "series": series}
    plt.close(fig)
    return data


def _lines_of(ax) -> dict[str, dict[str, list[float]]]:
    return {line.get_label(): {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def _bars_of(ax) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}
    for container in ax.containers:
        label = container.get_label()
        series[label] = [float(patch.get_height()) for patch in container.patches]
    return series


def plot_curve(series: dict[str, list[CurvePoint]], metric: str, path: Path) -> dict[str, Any]:
    """One metric (percent) vs number of safety training examples, one line per series (group [· algorithm])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    max_x = 0
    styles = _line_styles(series)
    for group, points in series.items():
        kept = [p for p in points if p.value(metric) is not None]
        if not kept:
            continue
        xs = [p.n_safety for p in kept]
        ys = [100.0 * p.value(metric) for p in kept]
        max_x = max(max_x, *xs)
        ax.plot(xs, ys, linewidth=2, label=group, **styles[group])
    positive = sorted({p.n_safety for pts in series.values() for p in pts if p.n_safety > 0})
    if len(positive) >= 2 and positive[-1] / positive[0] >= 20:
        ax.set_xscale("symlog", linthresh=max(1, positive[0]))
    ax.set_xlabel("safety training examples (preference pairs)")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{METRIC_LABELS[metric]} vs safety data: {METRIC_EXPLANATIONS[metric]}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(title=_legend_title(series))
    else:
        ax.text(0.5, 0.5, "no evaluated runs with a known data size", ha="center", va="center",
                transform=ax.transAxes)
    return _finish(plt, fig, ax, path, "line")


def plot_tradeoff(series: dict[str, list[CurvePoint]], path: Path) -> dict[str, Any]:
    """Over-refusal (x) against safety (y): the path each group takes as its data grows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    styles = _line_styles(series)
    for group, points in series.items():
        kept = [p for p in points if p.safety is not None and p.over_refusal is not None]
        if kept:
            ax.plot([100 * p.over_refusal for p in kept], [100 * p.safety for p in kept], label=group,
                    **styles[group])
            ax.annotate(f"n={kept[-1].n_safety}", (100 * kept[-1].over_refusal, 100 * kept[-1].safety),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("Over-refusal on benign prompts (%)")
    ax.set_ylabel("Safety on harmful prompts (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_title("Safety vs over-refusal (top-left is best)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(title=_legend_title(series))
    return _finish(plt, fig, ax, path, "line")


def plot_composition(composition: dict[str, dict[str, int]], path: Path) -> dict[str, Any]:
    """Mixture rows per group, stacked by split."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    groups = list(composition)
    splits = sorted({s for c in composition.values() for s in c}, key=lambda s: (s != "train", s))
    bottom = [0] * len(groups)
    for split in splits:
        heights = [composition[g].get(split, 0) for g in groups]
        ax.bar(groups, heights, bottom=bottom, label=split)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, total in enumerate(bottom):
        ax.annotate(str(total), (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("group")
    ax.set_ylabel("mixture rows (preference pairs)")
    _integer_y(ax)
    ax.set_title("Mixture composition by group and split", fontsize=10)
    if splits:
        ax.legend(title="split")
    return _finish(plt, fig, ax, path, "bar", categories=groups)


def plot_severity(severity: dict[str, dict[str, int]], path: Path) -> dict[str, Any]:
    """Mixture rows per group, grouped bars by severity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    groups = list(severity)
    levels = [lvl for lvl in ("minor", "moderate", "severe", "unknown") if any(lvl in s for s in severity.values())]
    levels += sorted({lvl for s in severity.values() for lvl in s} - set(levels))
    width = 0.8 / max(len(levels), 1)
    colours = {"minor": "#ffd24d", "moderate": "#ff8c1a", "severe": "#b30000", "unknown": "#bdbdbd"}
    for i, level in enumerate(levels):
        xs = [x + (i - (len(levels) - 1) / 2) * width for x in range(len(groups))]
        ax.bar(xs, [severity[g].get(level, 0) for g in groups], width=width, label=level, color=colours.get(level))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("group")
    ax.set_ylabel("mixture rows")
    _integer_y(ax)
    ax.set_title("Severity by group (unknown: no severity label)", fontsize=10)
    if levels:
        ax.legend(title="severity")
    return _finish(plt, fig, ax, path, "bar", categories=groups)


def plot_cluster_sizes(sizes: list[int], path: Path) -> dict[str, Any]:
    """Pool rows per embedding cluster, largest first: a long flat tail means diverse data."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(range(1, len(sizes) + 1), sizes, label="rows per cluster", color="#1f77b4")
    ax.set_xlabel("cluster (ranked by size)")
    ax.set_ylabel("pool rows")
    _integer_y(ax)
    ax.set_title(f"Cluster sizes: {len(sizes)} clusters, {sum(sizes)} pool rows", fontsize=10)
    return _finish(plt, fig, ax, path, "bar")
