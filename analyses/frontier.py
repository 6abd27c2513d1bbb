"""R^2-vs-L0 frontiers of a sweep and the paper's comparisons between them.

Definitions (docs/sweep-cpu.md states them too):

- A curve is one label (an architecture at a width, e.g. ``sa_gsae_H``) in one cell (model x
  hook). Its points are the sparsity settings: R^2 and L0 averaged over seeds, with the seed
  spread (min, max) kept. The frontier is the Pareto-efficient subset (``pareto``): sorted by
  L0, a point is kept when its R^2 is above that of every point of lower L0 (of points with
  equal L0, only the best).
- Between frontier points R^2 is interpolated linearly in log L0; outside them it is undefined.
- Over the overlapping L0 range of two curves, curve A strictly dominates curve B when
  R^2_A(L0) > R^2_B(L0) at every L0 of the overlap. The difference of two such piecewise-linear
  functions is linear between the union of their breakpoints, so checking every breakpoint and
  both ends is exact; a fine log-spaced grid is checked as well. ``min_gap`` / ``max_gap`` are the
  extremes of R^2_A - R^2_B over the overlap (``min_gap`` < 0: where A does not dominate, the
  largest shortfall).
- Dead fractions are interpolated the same way over all points (not only the frontier). A zero
  dead fraction is floored before any ratio (``dead_floor``; default half a latent of the wider
  SAE, 0.5 / max(d_sae)), since "no dead latent among F" only bounds the rate below 1/F.
- A run has collapsed when R^2 < 0.1 or its dead fraction > 0.9.

The rows are those of a sweep's results table (``sign_sae.runs``, with the polarity columns of
``analyses.sweep``); ``format_markdown`` writes the paper's comparison tables from ``analyse``.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from sign_sae.markdown import markdown_table

GRID_POINTS = 256
COLLAPSE_R2 = 0.1
COLLAPSE_DEAD = 0.9

Row = dict[str, Any]
T = TypeVar("T")


@dataclass
class Point:
    """One sparsity setting of a curve: means over seeds and the seed spread of R^2 and L0."""

    sparsity: float
    l0: float
    r2: float
    dead_fraction: float
    r2_min: float
    r2_max: float
    n_seeds: int
    l0_min: float
    l0_max: float


@dataclass
class Curve:
    """The points of one label in one cell, sorted by L0, and its Pareto frontier."""

    label: str
    points: list[Point]
    d_sae: int = 0

    @property
    def frontier(self) -> list[Point]:
        """The Pareto points, sorted by L0."""
        return pareto(self.points, key=lambda p: (p.l0, p.r2))

    @property
    def l0_range(self) -> tuple[float, float]:
        """The L0 span of the frontier."""
        f = self.frontier
        return f[0].l0, f[-1].l0

    def r2_at(self, l0: float) -> float:
        """R^2 on the frontier at ``l0`` (linear in log L0); NaN outside its range."""
        f = self.frontier
        return interpolate([p.l0 for p in f], [p.r2 for p in f], l0)

    def dead_at(self, l0: float) -> float:
        """Dead fraction at ``l0`` (linear in log L0 over all points); NaN outside their range."""
        pts = sorted(self.points, key=lambda p: p.l0)
        return interpolate([p.l0 for p in pts], [p.dead_fraction for p in pts], l0)


@dataclass
class Comparison:
    """Curve ``a`` against curve ``b`` over their overlapping L0 range (None when disjoint)."""

    a: str
    b: str
    overlap: tuple[float, float] | None
    dominates: bool | None
    min_gap: float | None
    max_gap: float | None
    l0_mid: float | None = None
    dead_a_mid: float | None = None
    dead_b_mid: float | None = None
    dead_ratio_mid: float | None = None
    dead_floor: float | None = None


@dataclass
class CellReport:
    """Every curve of one model x hook cell and the comparisons of the reference against the rest."""

    model: str
    hook: str
    reference: str
    curves: dict[str, Curve]
    comparisons: list[Comparison]
    dead_ratio_sweep: dict[str, float] = field(default_factory=dict)


def pareto(items: Iterable[T], key: Callable[[T], tuple[float, float]]) -> list[T]:
    """The Pareto front of ``items`` by ``key(item) = (L0, R^2)``, sorted by L0: an item is kept
    when its R^2 is above that of every item of lower L0 (of items with equal L0, the best)."""
    front: list[T] = []
    best = -math.inf
    for item in sorted(items, key=lambda it: (key(it)[0], -key(it)[1])):
        r2 = key(item)[1]
        if r2 > best:
            front.append(item)
            best = r2
    return front


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """y at ``x`` by linear interpolation in log x between sorted ``xs``; NaN outside them."""
    if not xs or x <= 0 or x < xs[0] * (1 - 1e-12) or x > xs[-1] * (1 + 1e-12):
        return float("nan")
    if len(xs) == 1:
        return float(ys[0])
    lx = math.log(x)
    for i in range(len(xs) - 1):
        x0, x1 = xs[i], xs[i + 1]
        if x <= x1 * (1 + 1e-12) or i == len(xs) - 2:
            if x1 == x0:
                return float(ys[i + 1])
            t = (lx - math.log(x0)) / (math.log(x1) - math.log(x0))
            t = min(max(t, 0.0), 1.0)
            return float(ys[i] + t * (ys[i + 1] - ys[i]))
    raise AssertionError("unreachable")


def overlap(a: Curve, b: Curve) -> tuple[float, float] | None:
    """The common L0 range of two frontiers, or None when they do not overlap."""
    lo = max(a.l0_range[0], b.l0_range[0])
    hi = min(a.l0_range[1], b.l0_range[1])
    return (lo, hi) if lo <= hi else None


def check_points(a: Curve, b: Curve, span: tuple[float, float]) -> list[float]:
    """Where dominance is checked: both ends, every breakpoint of either frontier inside the
    span, and ``GRID_POINTS`` log-spaced L0 values."""
    lo, hi = span
    pts = {lo, hi}
    pts.update(p.l0 for c in (a, b) for p in c.frontier if lo <= p.l0 <= hi)
    if hi > lo:
        step = (math.log(hi) - math.log(lo)) / (GRID_POINTS - 1)
        pts.update(math.exp(math.log(lo) + i * step) for i in range(1, GRID_POINTS - 1))
    return sorted(pts)


def compare(a: Curve, b: Curve, dead_floor: float | None = None) -> Comparison:
    """Dominance of ``a`` over ``b``, the R^2 gap range and the dead fractions at the overlap's
    geometric middle."""
    span = overlap(a, b)
    if span is None:
        return Comparison(a.label, b.label, None, None, None, None)
    gaps = [a.r2_at(x) - b.r2_at(x) for x in check_points(a, b, span)]
    floor = dead_floor if dead_floor is not None else 0.5 / max(a.d_sae, b.d_sae, 1)
    mid = math.sqrt(span[0] * span[1])
    dead_a, dead_b = a.dead_at(mid), b.dead_at(mid)
    return Comparison(
        a=a.label,
        b=b.label,
        overlap=span,
        dominates=min(gaps) > 0,
        min_gap=min(gaps),
        max_gap=max(gaps),
        l0_mid=mid,
        dead_a_mid=dead_a,
        dead_b_mid=dead_b,
        dead_ratio_mid=max(dead_b, floor) / max(dead_a, floor),
        dead_floor=floor,
    )


def geomean_dead(rows: Iterable[Row], floor: float) -> float:
    """Geometric mean of max(dead fraction, floor) over ``rows``; NaN when there are none."""
    logs = [math.log(max(float(r["dead_fraction"]), floor)) for r in rows]
    return math.exp(sum(logs) / len(logs)) if logs else float("nan")


def collapsed(row: Row) -> bool:
    """R^2 below ``COLLAPSE_R2`` or dead fraction above ``COLLAPSE_DEAD``."""
    return float(row["r2"]) < COLLAPSE_R2 or float(row["dead_fraction"]) > COLLAPSE_DEAD


def curves(rows: Iterable[Row]) -> dict[str, Curve]:
    """One curve per label: rows grouped by sparsity, averaged over seeds."""
    groups: dict[str, dict[float, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r["label"]][float(r["sparsity"])].append(r)
    out = {}
    for label, by_sparsity in groups.items():
        pts = []
        for sparsity, rs in by_sparsity.items():
            r2 = [float(r["r2"]) for r in rs]
            l0 = [float(r["l0"]) for r in rs]
            pts.append(
                Point(
                    sparsity=sparsity,
                    l0=_mean(l0),
                    r2=_mean(r2),
                    dead_fraction=_mean(float(r["dead_fraction"]) for r in rs),
                    r2_min=min(r2),
                    r2_max=max(r2),
                    n_seeds=len(rs),
                    l0_min=min(l0),
                    l0_max=max(l0),
                )
            )
        d_sae = max(int(r["d_sae"]) for rs in by_sparsity.values() for r in rs)
        out[label] = Curve(label, sorted(pts, key=lambda p: p.l0), d_sae)
    return out


def cells(rows: Iterable[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows grouped by (model, hook)."""
    out: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["hook"])].append(r)
    return dict(out)


def analyse_cell(
    model: str,
    hook: str,
    rows: Sequence[Row],
    reference: str,
    dead_floor: float | None = None,
) -> CellReport:
    """Curves of one cell and ``reference`` against every other label. Ablation rows are left
    out, and so are rows without a positive L0 and a finite R^2 (a collapsed run with L0 = 0 has
    no place on a log-L0 axis; ``analyse`` reports it under ``collapsed``)."""
    plain = [r for r in rows if not r.get("ablation_of") and _plottable(r)]
    cs = curves(plain)
    comps, ratios = [], {}
    ref = cs.get(reference)
    if ref is not None:
        for label, other in cs.items():
            if label == reference:
                continue
            comps.append(compare(ref, other, dead_floor))
            floor = dead_floor if dead_floor is not None else 0.5 / max(ref.d_sae, other.d_sae)
            ratios[label] = geomean_dead(
                (r for r in plain if r["label"] == label), floor
            ) / geomean_dead((r for r in plain if r["label"] == reference), floor)
    return CellReport(model, hook, reference, cs, comps, ratios)


def ablations(rows: Sequence[Row]) -> list[Row]:
    """Each ablation row beside its reference run (same cell, sparsity and seed): R^2, L0, dead
    fraction, CE loss recovered, KL, |Delta R^2| and whether it collapsed."""
    index = {
        (r["model"], r["hook"], r["label"], float(r["sparsity"]), int(r["seed"])): r for r in rows
    }
    out = []
    for r in rows:
        parent = r.get("ablation_of")
        if not parent:
            continue
        ref = index.get((r["model"], r["hook"], parent, float(r["sparsity"]), int(r["seed"])))
        out.append(
            {
                "model": r["model"],
                "hook": r["hook"],
                "label": r["label"],
                "reference": parent,
                "sparsity": float(r["sparsity"]),
                "seed": int(r["seed"]),
                "d_sae": int(r["d_sae"]),
                "r2": float(r["r2"]),
                "l0": float(r["l0"]),
                "dead_fraction": float(r["dead_fraction"]),
                "ce_loss_recovered": _num(r.get("ce_loss_recovered")),
                "kl_with_sae": _num(r.get("kl_with_sae")),
                "collapsed": collapsed(r),
                "ref_r2": float(ref["r2"]) if ref else None,
                "ref_dead_fraction": float(ref["dead_fraction"]) if ref else None,
                "ref_ce_loss_recovered": _num(ref.get("ce_loss_recovered")) if ref else None,
                "ref_kl_with_sae": _num(ref.get("kl_with_sae")) if ref else None,
                "abs_delta_r2": abs(float(r["r2"]) - float(ref["r2"])) if ref else None,
            }
        )
    return out


def parameters(rows: Sequence[Row], reference: str) -> list[Row]:
    """Width and parameter count of every label per cell, and the count over the reference's."""
    seen: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        key = (r["model"], r["hook"], r["label"])
        if key not in seen:
            seen[key] = {
                "model": r["model"],
                "hook": r["hook"],
                "label": r["label"],
                "architecture": r["arch"],
                "d_in": int(r["d_in"]),
                "d_sae": int(r["d_sae"]),
                "n_params": int(r["n_params_train"]),
            }
    for p in seen.values():
        ref = seen.get((p["model"], p["hook"], reference))
        p["vs_reference"] = p["n_params"] / ref["n_params"] if ref else None
    return list(seen.values())


POLARITY_COLUMNS = (
    "census_bipolar_fraction",
    "null_bipolar_fraction",
    "top1_share",
    "top10_share",
    "minority_fraction",
)


def polarity(rows: Sequence[Row]) -> list[Row]:
    """The polarity census columns of every run with minority-sign mass (signed SAEs; for a
    non-negative SAE the bipolar fraction is 0 and there is nothing to concentrate)."""
    keep = ("model", "hook", "label", "sparsity", "seed", "l0", *POLARITY_COLUMNS)
    return [
        {k: r.get(k) for k in keep}
        for r in sorted(
            rows, key=lambda r: (r["model"], r["hook"], r["label"], float(r["sparsity"]), r["seed"])
        )
        if _num(r.get("top1_share")) is not None
    ]


def analyse(
    rows: Sequence[Row], reference: str = "sa_gsae_H", dead_floor: float | None = None
) -> dict[str, Any]:
    """Every comparison of the sweep: per-cell frontier reports, the geometric mean of the
    dead-fraction ratios over cells, ablations, collapse flags, parameter counts and the
    polarity columns of the signed runs."""
    reports = [
        analyse_cell(model, hook, rs, reference, dead_floor)
        for (model, hook), rs in sorted(cells(rows).items())
    ]
    by_label: dict[str, list[float]] = defaultdict(list)
    for rep in reports:
        for label, ratio in rep.dead_ratio_sweep.items():
            if math.isfinite(ratio) and ratio > 0:
                by_label[label].append(ratio)
    return {
        "reference": reference,
        "cells": reports,
        "dead_ratio_geomean": {
            k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in by_label.items()
        },
        "ablations": ablations(rows),
        "collapsed": [
            {k: r[k] for k in ("model", "hook", "label", "sparsity", "seed", "r2", "dead_fraction")}
            for r in rows
            if collapsed(r)
        ],
        "parameters": parameters(rows, reference),
        "polarity": polarity(rows),
    }


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """``analyse``'s result as plain JSON-able data (NaN becomes None)."""
    return _clean({**result, "cells": [asdict(c) for c in result["cells"]]})


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _plottable(r: Row) -> bool:
    r2, l0 = _num(r.get("r2")), _num(r.get("l0"))
    return r2 is not None and l0 is not None and l0 > 0


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _mean(values: Iterable[float]) -> float:
    vs = list(values)
    return sum(vs) / len(vs)


# ---- Markdown: the paper's tables ---------------------------------------------------------------
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
            *(_f(_num(p[c]), ".3f") for c in POLARITY_COLUMNS),
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


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)
