"""Self-contained HTML reports of a run or a sweep: one file that opens offline and is safe to open.

``render(run_dir, out_path, options)`` writes the report of a run folder (metrics, parameter
accounting, figures, a dashboard per selected latent); ``render_release(release, out_path,
options)`` the same for a registered release's SAEs (a shipped one needs no training); both take
one ``ReportOptions``. ``render_sweep(results, out_path)`` writes the table and the R^2-vs-L0
frontier of a sweep's results. The circuitsvis bundle is inlined once, plots
are inline SVG, a Content-Security-Policy forbids every network request and every script but the
page's own two, and every token and label is escaped. See docs/report.md.
"""

from pathlib import Path

from analyses.report.gather import collect, collect_release, fronts, read_rows
from analyses.report.layout import Report, page
from analyses.report.options import ReportOptions
from sign_sae.storage import atomic_write_text

__all__ = [
    "Report",
    "ReportOptions",
    "collect",
    "collect_release",
    "page",
    "render",
    "render_release",
    "render_sweep",
    "write",
]


def render(run_dir: str | Path, out_path: str | Path, options: ReportOptions | None = None) -> Path:
    """Write the HTML report of the run folder ``run_dir`` to ``out_path``; returns its path."""
    return write(collect(run_dir, options), out_path)


def render_release(
    release: str,
    out_path: str | Path,
    options: ReportOptions | None = None,
    text: str = "shakespeare",
    split: str = "validation",
    context_size: int = 128,
) -> Path:
    """Write the HTML report of a registered release's SAEs (all, or ``options.saes``) without
    training anything, analysed on ``split`` of ``text`` cut into ``context_size`` rows."""
    return write(collect_release(release, options, text, split, context_size), out_path)


def render_sweep(results: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Write the report of a sweep's results (JSON rows or CSV with r2, l0, architecture, ...):
    the table (up to ``layout.MAX_TABLE_ROWS`` rows) and the R^2-vs-L0 frontier of every row."""
    rows = read_rows(results)
    usable = sum(1 for r in rows if r.get("r2") is not None and r.get("l0") is not None)
    report = Report(
        title=title or f"sign-sae sweep: {Path(results).name}",
        facts=[("rows", f"{len(rows):,}"), ("with r2 and l0", f"{usable:,}")],
        rows=rows,
        fronts=fronts(rows),
    )
    return write(report, out_path)


def write(report: Report, out_path: str | Path) -> Path:
    """Write ``report`` as one HTML file, atomically."""
    path = Path(out_path)
    atomic_write_text(path, page(report))
    return path
