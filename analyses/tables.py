"""The paper's comparison tables in Markdown, from ``analyses.frontier.analyse``'s result.

``format_markdown`` writes one titled table per comparison (``sign-sae frontier`` writes it to
``frontier.md``); the numbers are computed in ``analyses.frontier``, only formatted here.
"""

import math
from typing import Any

from analyses.frontier import COLLAPSE_DEAD, COLLAPSE_R2, POLARITY_COLUMNS, CellReport
from sign_sae.markdown import markdown_table


def format_markdown(result: dict[str, Any]) -> str:
    """``analyse``'s result as Markdown: one titled table per comparison (optional tables left
    out when empty)."""
    sections = [
        _points_section(result),
        _comparisons_section(result),
        _dead_ratio_section(result),
        _ablations_section(result),
        _collapsed_section(result),
        _parameters_section(result),
        _polarity_section(result),
    ]
    return "\n\n".join(s for s in sections if s is not None) + "\n"


def _section(title: str, body: str) -> str:
    return f"### {title}\n\n{body}"


def _points_section(result: dict[str, Any]) -> str:
    head = ["cell", "label", "sparsity", "seeds", "L0", "R^2", "R^2 range", "L0 range", "dead"]
    rows = [
        [
            _cell_name(c),
            label,
            f"{p.sparsity:g}",
            p.n_seeds,
            f"{p.l0:.1f}",
            f"{p.r2:.3f}",
            f"{p.r2_min:.3f} to {p.r2_max:.3f}" if p.n_seeds > 1 else "",
            f"{p.l0_min:.1f} to {p.l0_max:.1f}" if p.n_seeds > 1 else "",
            f"{p.dead_fraction:.3f}",
        ]
        for c in result["cells"]
        for label, curve in sorted(c.curves.items())
        for p in curve.points
    ]
    return _section(
        "Curve points (means over seeds; ranges over seeds)", markdown_table(head, rows)
    )


def _comparisons_section(result: dict[str, Any]) -> str:
    ref = result["reference"]
    head = [
        "cell", "vs", "L0 overlap", "dominates", "min gap", "max gap", "L0 mid", f"dead {ref}",
        "dead other", "dead ratio at mid", "dead ratio (sweep geomean)",
    ]  # fmt: skip
    rows = [
        [
            _cell_name(c),
            k.b,
            _span(k.overlap),
            _yes(k.dominates),
            _f(k.min_gap, "+.3f"),
            _f(k.max_gap, "+.3f"),
            _f(k.l0_mid, ".1f"),
            _f(k.dead_a_mid, ".3f"),
            _f(k.dead_b_mid, ".3f"),
            _f(k.dead_ratio_mid, ".2f"),
            _f(c.dead_ratio_sweep.get(k.b), ".2f"),
        ]
        for c in result["cells"]
        for k in c.comparisons
    ]
    title = f"{ref} against each curve over the overlapping L0 range"
    return _section(title, markdown_table(head, rows))


def _dead_ratio_section(result: dict[str, Any]) -> str | None:
    ratios = result["dead_ratio_geomean"]
    if not ratios:
        return None
    rows = [[k, f"{v:.2f}"] for k, v in sorted(ratios.items())]
    return _section(
        "Dead-fraction ratio (other / reference), geometric mean over cells",
        markdown_table(["vs", "ratio"], rows),
    )


def _ablations_section(result: dict[str, Any]) -> str | None:
    if not result["ablations"]:
        return None
    head = [
        "cell", "ablation", "of", "sparsity", "seed", "d_sae", "R^2", "L0", "dead", "CE rec.",
        "KL", "ref R^2", "ref dead", "ref CE rec.", "ref KL", "abs dR^2", "collapsed",
    ]  # fmt: skip
    rows = [
        [
            f"{a['model']} {a['hook']}",
            a["label"],
            a["reference"],
            f"{a['sparsity']:g}",
            a["seed"],
            a["d_sae"],
            f"{a['r2']:.3f}",
            f"{a['l0']:.1f}",
            f"{a['dead_fraction']:.3f}",
            _f(a["ce_loss_recovered"], ".3f"),
            _f(a["kl_with_sae"], ".3f"),
            _f(a["ref_r2"], ".3f"),
            _f(a["ref_dead_fraction"], ".3f"),
            _f(a["ref_ce_loss_recovered"], ".3f"),
            _f(a["ref_kl_with_sae"], ".3f"),
            _f(a["abs_delta_r2"], ".4f"),
            _yes(a["collapsed"]),
        ]
        for a in result["ablations"]
    ]
    return _section(
        "Ablations (each beside its reference run: same cell, sparsity, seed)",
        markdown_table(head, rows),
    )


def _collapsed_section(result: dict[str, Any]) -> str:
    head = ["cell", "label", "sparsity", "seed", "R^2", "dead"]
    rows = [
        [
            f"{r['model']} {r['hook']}",
            r["label"],
            f"{float(r['sparsity']):g}",
            r["seed"],
            f"{float(r['r2']):.3f}",
            f"{float(r['dead_fraction']):.3f}",
        ]
        for r in result["collapsed"]
    ]
    return _section(
        f"Collapsed runs (R^2 < {COLLAPSE_R2} or dead > {COLLAPSE_DEAD})",
        markdown_table(head, rows) if rows else "none",
    )


def _parameters_section(result: dict[str, Any]) -> str:
    head = [
        "cell",
        "label",
        "architecture",
        "d_in",
        "d_sae",
        "parameters",
        f"/ {result['reference']}",
    ]
    rows = [
        [
            f"{p['model']} {p['hook']}",
            p["label"],
            p["architecture"],
            p["d_in"],
            p["d_sae"],
            f"{p['n_params']:,}",
            _f(p["vs_reference"], ".3f"),
        ]
        for p in result["parameters"]
    ]
    return _section("Parameters", markdown_table(head, rows))


def _polarity_section(result: dict[str, Any]) -> str | None:
    if not result["polarity"]:
        return None
    head = [
        "cell", "label", "sparsity", "seed", "L0", "bipolar", "bipolar (sign-flip null)",
        "top-1 share", "top-10 share", "minority mass",
    ]  # fmt: skip
    rows = [
        [
            f"{p['model']} {p['hook']}",
            p["label"],
            f"{float(p['sparsity']):g}",
            p["seed"],
            f"{float(p['l0']):.1f}",
            *(_f(p[c], ".3f") for c in POLARITY_COLUMNS),
        ]
        for p in result["polarity"]
    ]
    return _section(
        "Polarity of the signed runs (held-out census, balance >= 0.1)", markdown_table(head, rows)
    )


def _cell_name(c: CellReport) -> str:
    return f"{c.model} {c.hook}"


def _span(s: tuple[float, float] | None) -> str:
    return "none" if s is None else f"{s[0]:.1f}-{s[1]:.1f}"


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _f(v: Any, spec: str) -> str:
    """A number through ``spec``; '-' for a missing (None, empty) or non-finite value."""
    if v is None or v == "" or not math.isfinite(float(v)):
        return "-"
    return format(float(v), spec)
