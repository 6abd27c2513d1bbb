"""Standalone SVG figures of a sweep's frontiers: per cell of ``analyses.frontier.analyse``'s
result, R^2 and dead fraction against L0, drawn with ``analyses.report.plots``.
"""

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from analyses.frontier import CellReport, Curve
from analyses.report import plots
from sign_sae.storage import atomic_write_text

_STYLE = (
    "text{font:11px sans-serif;fill:#333}.t{font-size:13px;font-weight:600;text-anchor:middle}"
    ".xt,.xl,.yl{text-anchor:middle}.yt{text-anchor:end}.frame{fill:none;stroke:#bbb}"
    ".grid{stroke:#eee}.msg{fill:#777;text-anchor:middle}"
)
_SIZE = (520, 320)
_LEGEND_ROW = 16
_XPAD = 1.25  # log-axis margin, so that end points do not sit on the frame


def write_plots(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Two SVG files per cell of ``analyses.frontier.analyse``'s result: R^2 vs L0 (frontier
    points with the seed range as a bar) and dead fraction vs L0. Returns their paths."""
    out = Path(out_dir)
    paths = []
    for cell in result["cells"]:
        stem = f"frontier_{_slug(cell.model)}_{_slug(cell.hook)}"
        for suffix, svg in (("r2", r2_plot(cell)), ("dead", dead_plot(cell))):
            path = out / f"{stem}_{suffix}.svg"
            atomic_write_text(path, svg)
            paths.append(path)
    return paths


def r2_plot(cell: CellReport) -> str:
    """R^2 against L0 (log) for every label: the frontier as a line, every sparsity point as a
    dot, and a cross over the seed ranges of R^2 and L0 where a point has several seeds."""
    series = []
    for i, (label, curve) in enumerate(_ordered(cell)):
        color = plots.color(i)
        f = curve.frontier
        series.append(plots.Series(label, [p.l0 for p in f], [p.r2 for p in f], color))
        series.append(
            plots.Series(
                "",
                [p.l0 for p in curve.points],
                [p.r2 for p in curve.points],
                color,
                kind="points",
                titles=[
                    f"{label} sparsity {p.sparsity:g}: L0 {p.l0:.1f}, R^2 {p.r2:.3f}"
                    f" ({p.n_seeds} seed(s))"
                    for p in curve.points
                ],
            )
        )
        for p in curve.points:
            if p.n_seeds > 1:  # the seed range as a cross: R^2 up and down, L0 left and right
                series.append(plots.Series("", [p.l0, p.l0], [p.r2_min, p.r2_max], color))
                series.append(plots.Series("", [p.l0_min, p.l0_max], [p.r2, p.r2], color))
    title = f"{cell.model} {cell.hook}: R^2 vs L0"
    return standalone(series, title, "L0 (log)", "R^2 (held out)", _labels(cell))


def dead_plot(cell: CellReport) -> str:
    """Dead fraction against L0 (log) for every label, over all of its points."""
    series = [
        plots.Series(
            label,
            [p.l0 for p in curve.points],
            [p.dead_fraction for p in curve.points],
            plots.color(i),
        )
        for i, (label, curve) in enumerate(_ordered(cell))
    ]
    title = f"{cell.model} {cell.hook}: dead fraction vs L0"
    return standalone(series, title, "L0 (log)", "dead fraction (held out)", _labels(cell))


def standalone(
    series: Sequence[plots.Series],
    title: str,
    xlabel: str,
    ylabel: str,
    labels: list[str],
    xlog: bool = True,
) -> str:
    """A self-contained SVG file: ``plots.chart``'s SVG (by default a log x axis with a margin)
    with its styles and the legend drawn inside (the chart's HTML legend needs a page around
    it). ``labels`` are the legend's entries, in palette order."""
    xs = [x for s in series for x in s.x if x > 0]
    xlim = (min(xs) / _XPAD, max(xs) * _XPAD) if xs and xlog else None
    figure = plots.chart(series, title, xlabel, ylabel, xlog=xlog, xlim=xlim, size=_SIZE)
    inner = figure[figure.index("<svg") : figure.index("</svg>") + len("</svg>")]
    w, h = _SIZE
    legend = []
    for i, label in enumerate(labels):
        y = h + 6 + i * _LEGEND_ROW
        legend.append(
            f'<rect x="60" y="{y}" width="10" height="10" fill="{plots.color(i)}"/>'
            f'<text x="76" y="{y + 9}">{escape(label)}</text>'
        )
    total = h + 12 + len(labels) * _LEGEND_ROW
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {total}" width="{w}" '
        f'height="{total}"><style>{_STYLE}</style><rect width="{w}" height="{total}" '
        f'fill="#fff"/>{inner}{"".join(legend)}</svg>\n'
    )


def _ordered(cell: CellReport) -> list[tuple[str, Curve]]:
    """The reference curve first (first colour), then the others by label."""
    return sorted(cell.curves.items(), key=lambda kv: (kv[0] != cell.reference, kv[0]))


def _labels(cell: CellReport) -> list[str]:
    return [label for label, _ in _ordered(cell)]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
