"""PNG charts with matplotlib (imported lazily, Agg backend).

Every function draws, saves, and returns the data actually on the axes (read back from the
matplotlib artists, not from its inputs), so tests and ``plots.json`` check what was drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from equi.errors import EquiError
from equi.reporting.runs import METRIC_LABELS, CurvePoint, split_label

#: Every figure of the report has this size (inches), so the page lays them out alike.
FIGSIZE = (6.4, 4.2)
#: Error bars are drawn as containers labelled with this prefix (kept out of the legend, read back by tests).
CI_PREFIX = "_ci "

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


class PlottingUnavailable(EquiError, ImportError):
    """matplotlib is missing: the report cannot draw its plots."""


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
    fig.tight_layout(rect=(0, 0.06, 1, 1) if fig.texts else None)  # room for a caption (fig.text) below
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
    if kind == "line":
        data["errorbars"] = _errorbars_of(ax)
        data["size_px"] = [int(round(v)) for v in fig.get_size_inches() * fig.dpi]
    plt.close(fig)
    return data


def _lines_of(ax) -> dict[str, dict[str, list[float]]]:
    return {line.get_label(): {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def _errorbars_of(ax) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per series, the error bars drawn (``y``: vertical, ``x``: horizontal), each as ``at`` (the other
    coordinate), ``lo`` and ``hi``, read back from the bars' line segments."""
    bars: dict[str, dict[str, dict[str, list[float]]]] = {}
    for container in ax.containers:
        label = container.get_label() or ""
        if not label.startswith(CI_PREFIX):
            continue
        name, _, axis = label[len(CI_PREFIX):].rpartition("|")
        for collection in container.lines[2]:
            segments = collection.get_segments()
            col = 0 if axis == "y" else 1  # vertical bars share x; horizontal ones share y
            bars.setdefault(name, {})[axis] = {
                "at": [float(seg[0][col]) for seg in segments],
                "lo": [float(min(seg[0][1 - col], seg[1][1 - col])) for seg in segments],
                "hi": [float(max(seg[0][1 - col], seg[1][1 - col])) for seg in segments]}
    return bars


def _error_bars(ax, label: str, xs: list[float], ys: list[float], intervals: list[tuple[float, float] | None],
                colour: str | None, axis: str = "y") -> None:
    """Wilson 95% bars (percent) around the points that have an interval; labelled out of the legend."""
    kept = [(x, y, ci) for x, y, ci in zip(xs, ys, intervals) if ci is not None]
    if not kept:
        return
    px, py = [x for x, _, _ in kept], [y for _, y, _ in kept]
    centre = py if axis == "y" else px
    err = [[max(0.0, c - 100 * ci[0]) for c, (_, _, ci) in zip(centre, kept)],
           [max(0.0, 100 * ci[1] - c) for c, (_, _, ci) in zip(centre, kept)]]
    ax.errorbar(px, py, **{f"{axis}err": err}, fmt="none", ecolor=colour or "#555555", elinewidth=1, capsize=3,
                alpha=0.6, label=f"{CI_PREFIX}{label}|{axis}")


def _prompt_counts(series: dict[str, list[CurvePoint]], metrics: tuple[str, ...]) -> str:
    """``"n = prompts per point: EHD 10; IHD 8–10"``: the prompts each series' rates rest on."""
    parts = []
    for label, points in series.items():
        ns = sorted({n for p in points for m in metrics if (n := p.prompts(m)) is not None})
        if ns:
            parts.append(f"{label} {ns[0]}" + (f"–{ns[-1]}" if ns[-1] != ns[0] else ""))
    return ("n = prompts per point: " + "; ".join(parts) + ". Bars: Wilson 95% intervals") if parts else ""


def _caption(fig, text: str) -> None:
    if text:
        caption = fig.text(0.01, 0.005, text, fontsize=7, color="#444444", ha="left", va="bottom", wrap=True)
        caption.set_parse_math(False)


def _bars_of(ax) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}
    for container in ax.containers:
        label = container.get_label()
        series[label] = [float(patch.get_height()) for patch in container.patches]
    return series


def plot_curve(series: dict[str, list[CurvePoint]], metric: str, path: Path) -> dict[str, Any]:
    """One metric (percent) vs number of safety training examples, one line per series (group [· algorithm])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
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
        _error_bars(ax, group, xs, ys, [p.interval(metric) for p in kept], styles[group]["color"])
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
    caption = _prompt_counts(series, (metric,))
    _caption(fig, caption)
    return _finish(plt, fig, ax, path, "line", caption=caption)


#: Where a point's label may go, in points from the point, tried in order until one overlaps nothing drawn.
LABEL_OFFSETS = [(dx, dy) for dy in (6, -14, 18, -26, 30, -38, 42, -50) for dx in (6, -6)]


def _place_labels(fig, ax, points: list[tuple[float, float, str, str | None]]) -> list[dict[str, Any]]:
    """Label each point (x, y, text, colour) beside it without overprinting: offsets are tried in turn
    (right/left, then further up/down) until the label's box overlaps no earlier label nor the legend and stays
    inside the axes.
    Returns each label's text and box in pixels, so a test can check that none overlap."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    placed: list[Any] = [legend.get_window_extent(renderer)] if legend is not None else []
    labels: list[dict[str, Any]] = []
    for x, y, text, colour in points:
        artist = None
        for dx, dy in LABEL_OFFSETS:
            if artist is not None:
                artist.remove()
            artist = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                 color=colour or "#222222", ha="left" if dx > 0 else "right", va="bottom",
                                 annotation_clip=False)
            artist.set_parse_math(False)
            box = artist.get_window_extent(renderer)
            within = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                      and box.y1 <= inside.y1)
            if within and not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)
        labels.append({"text": text, "box": [float(box.x0), float(box.y0), float(box.x1), float(box.y1)]})
    return labels


def plot_tradeoff(series: dict[str, list[CurvePoint]], path: Path) -> dict[str, Any]:
    """Over-refusal (x) against safety (y): the path each group takes as its data grows. Each series' last point
    is labelled with its size, placed so labels do not overprint; bars are Wilson 95% intervals both ways."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    styles = _line_styles(series)
    ends: list[tuple[float, float, str, str | None]] = []
    for group, points in series.items():
        kept = [p for p in points if p.safety is not None and p.over_refusal is not None]
        if kept:
            xs, ys = [100 * p.over_refusal for p in kept], [100 * p.safety for p in kept]
            ax.plot(xs, ys, label=group, **styles[group])
            _error_bars(ax, group, xs, ys, [p.interval("safety") for p in kept], styles[group]["color"], "y")
            _error_bars(ax, group, xs, ys, [p.interval("over_refusal") for p in kept], styles[group]["color"], "x")
            ends.append((xs[-1], ys[-1], f"{kept[-1].n_safety} ex.", styles[group]["color"]))
    ax.set_xlabel("Over-refusal on benign prompts (%)")
    ax.set_ylabel("Safety on harmful prompts (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_title("Safety vs over-refusal (top-left is best); labels: safety examples", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(title=_legend_title(series), loc="lower right", fontsize=8, title_fontsize=8)
        _literal_legend(ax)  # before tight_layout measures the legend's text
    caption = _prompt_counts(series, ("safety", "over_refusal"))
    _caption(fig, caption)
    fig.tight_layout(rect=(0, 0.06, 1, 1) if fig.texts else None)  # final layout before measuring the labels
    labels = _place_labels(fig, ax, ends)
    return _finish(plt, fig, ax, path, "line", caption=caption, labels=labels)


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
