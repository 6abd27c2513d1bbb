"""R^2-vs-L0 frontiers of a sweep and the paper's comparisons between them.

Definitions (docs/sweep-cpu.md states them too):

- A curve is one label (an architecture at a width, e.g. ``sa_gsae_H``) in one cell (model x
  hook). Its points are the sparsity settings: R^2 and L0 averaged over seeds, with the seed
  spread (min, max) kept. The frontier is the Pareto-efficient subset (``pareto``): sorted by
  L0, a point is kept when its R^2 is above that of every point of lower L0 (of points with
  equal L0, only the best).
- Between frontier points R^2 is interpolated linearly in log L0 (``interpolate``); outside them
  it is undefined (NaN).
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
``analyses.sweep``). This module computes; ``analyses.tables`` writes the paper's comparison
tables from ``analyse``'s result and ``analyses.frontier_plots`` its figures.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

GRID_POINTS = 256
COLLAPSE_R2 = 0.1
COLLAPSE_DEAD = 0.9

Row = dict[str, Any]
T = TypeVar("T")


@dataclass
class CurvePoint:
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
    points: list[CurvePoint]
    d_sae: int = 0

    @property
    def frontier(self) -> list[CurvePoint]:
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


def interpolate(
    xs: Sequence[float], ys: Sequence[float], x: float | np.ndarray, extend: bool = False
) -> float | np.ndarray:
    """y at ``x`` (a number or an array) by linear interpolation in log x between the points
    (``xs`` sorted and > 0): the one interpolation in L0 of the toolkit.

    Outside ``[xs[0], xs[-1]]`` the value is NaN, since a curve says nothing beyond its ends (a
    relative 1e-12 at either end absorbs rounding and gives the end value). ``extend=True``
    extends the end segments instead (one point: its own y), for a score that must exist
    wherever the target lies (the fair benchmark's tuning score)."""
    at = np.atleast_1d(np.asarray(x, dtype=float))
    if np.ndim(x) == 0:  # one value: math.log, as exact as the scalar arithmetic it replaced
        t = np.array([math.log(x) if x > 0 else math.nan])
        lx = np.array([math.log(v) for v in xs])
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.log(np.where(at > 0, at, math.nan))
        lx = np.log(np.asarray(xs, dtype=float))
    fy = np.asarray(ys, dtype=float)
    if len(xs) < 2:
        y = np.full(at.shape, fy[0] if len(xs) else math.nan)
    else:
        i = np.clip(np.searchsorted(lx, t) - 1, 0, len(xs) - 2)
        dx = lx[i + 1] - lx[i]
        w = np.divide(t - lx[i], dx, out=np.ones_like(t), where=dx > 0)
        y = fy[i] + (w if extend else np.clip(w, 0.0, 1.0)) * (fy[i + 1] - fy[i])
    if not extend:
        lo, hi = (xs[0] * (1 - 1e-12), xs[-1] * (1 + 1e-12)) if len(xs) else (1.0, 0.0)
        y = np.where((at >= lo) & (at <= hi), y, math.nan)
    y = np.where(np.isnan(t), math.nan, y)
    return float(y[0]) if np.ndim(x) == 0 else y


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


def compare_curves(a: Curve, b: Curve, dead_floor: float | None = None) -> Comparison:
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
                CurvePoint(
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
            comps.append(compare_curves(ref, other, dead_floor))
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
