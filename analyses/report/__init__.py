"""Self-contained HTML reports of a run or a sweep: one file that opens offline and is safe to open.

``render(run_dir, out_path)`` writes the report of a run folder (metrics, parameter accounting,
figures, a dashboard per selected latent); ``render_release(release, out_path)`` the same for a
registered release's SAEs (a shipped one needs no training); ``render_sweep(results, out_path)`` writes the table
and the R^2-vs-L0 frontier of a sweep's results. The circuitsvis bundle is inlined once, plots
are inline SVG, a Content-Security-Policy forbids every network request and every script but the
page's own two, and every token and label is escaped. See docs/report.md.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analyses.report.gather import DEFAULT_ALPHAS, Latents, collect, collect_release, read_rows
from analyses.report.layout import Report, page
from sign_sae.storage import atomic_write_text

__all__ = [
    "Report",
    "collect",
    "collect_release",
    "page",
    "render",
    "render_release",
    "render_sweep",
    "write",
]


def render(
    run_dir: str | Path,
    out_path: str | Path,
    model: Any | None = None,
    latents: Latents | None = None,
    n_latents: int = 4,
    saes: Sequence[str] | None = None,
    n_tokens: int = 8192,
    n_examples: int = 8,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_prompts: int = 4,
    prompt_len: int = 32,
    batch_size: int = 8,
) -> Path:
    """Write the HTML report of the run folder ``run_dir`` to ``out_path``; returns its path.

    ``model``: the run's model (loaded by the name its runs record when None). ``latents``: ids
    shown for every SAE, or ``{sae name: ids}`` (names: ``sign_sae.runs.short_names``); by
    default the ``n_latents`` latents of largest minority-sign mass, and for a non-negative SAE
    beside a signed one the latents matching the signed ones' +d and -d. ``saes``: which SAEs of the run (default all trained ones).
    ``n_tokens`` held-out tokens feed the census and the examples (``n_examples`` per sign per
    latent); the steering dial runs ``alphas`` (in typical firings of the latent) on the first
    ``n_prompts`` eval rows cut to ``prompt_len`` tokens (empty ``alphas``: no dials).
    """
    report = collect(
        run_dir,
        model,
        latents,
        n_latents,
        saes,
        n_tokens,
        n_examples,
        alphas,
        n_prompts,
        prompt_len,
        batch_size,
    )
    return write(report, out_path)


def render_release(
    release: str, out_path: str | Path, sae_ids: Sequence[str] | None = None, **kwargs: Any
) -> Path:
    """Write the HTML report of a registered release's SAEs (all, or ``sae_ids``) without
    training anything; ``kwargs`` as ``render`` (and ``text``, ``split``, ``context_size`` of
    the held-out text, default the validation plays)."""
    return write(collect_release(release, sae_ids, **kwargs), out_path)


def render_sweep(results: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Write the report of a sweep's results (JSON rows or CSV with r2, l0, architecture, ...):
    the table (up to ``layout.MAX_TABLE_ROWS`` rows) and the R^2-vs-L0 frontier of every row."""
    rows = read_rows(results)
    usable = sum(1 for r in rows if r.get("r2") is not None and r.get("l0") is not None)
    report = Report(
        title=title or f"sign-sae sweep: {Path(results).name}",
        facts=[("rows", f"{len(rows):,}"), ("with r2 and l0", f"{usable:,}")],
        rows=rows,
    )
    return write(report, out_path)


def write(report: Report, out_path: str | Path) -> Path:
    """Write ``report`` as one HTML file, atomically."""
    path = Path(out_path)
    atomic_write_text(path, page(report))
    return path
