"""R^2 gaps between two frontiers, under two interpolations, with paired bootstrap intervals.

A curve here maps each sparsity setting to the held-out ``SequenceStats`` of its seeds (every
run evaluated on the same held-out sequences). Its points are R^2 and L0 averaged over seeds;
its frontier is their Pareto front (``analyses.frontier.pareto``). Between frontier points R^2 is
interpolated in log L0, either linearly (``log_linear``) or by a monotone cubic (``pchip``,
scipy's PchipInterpolator), and is undefined (NaN) outside them, as ``analyses.frontier.interpolate``
says. The gap of A over B is
R^2_A(L0) - R^2_B(L0) over the overlap of their L0 ranges, checked at both ends, every
breakpoint inside and ``GRID_POINTS`` log-spaced L0 values; ``min_gap`` and ``max_gap`` are its
extremes and ``mean_gap`` its mean over the log-spaced values (uniform in log L0).

The interval combines the two sources of noise a reader cares about:

- held-out text: each draw reweights the held-out sequences by multinomial counts, the same
  counts for every run of both curves (paired: both SAEs see the same resampled text);
- training seed: each draw resamples, per sparsity setting, its seeds with replacement.

The percentile interval of ``min_gap`` (and of ``max_gap``) over the draws gives the verdict:
A dominates B when the lower bound of ``min_gap`` is above 0, B dominates A when the upper bound
of ``max_gap`` is below 0, and otherwise the two match within the interval.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator

from analyses.frontier import GRID_POINTS, interpolate, pareto
from sign_sae.errors import SignSAEError
from sign_sae.metrics import SequenceStats

INTERPOLATIONS = ("log_linear", "pchip")

# The runs of one curve: sparsity setting -> the SequenceStats of each seed.
SettingRuns = Mapping[float, Sequence[SequenceStats]]


@dataclass
class Gap:
    """The gap of ``a`` over ``b`` under one interpolation, with bootstrap intervals."""

    a: str
    b: str
    interpolation: str
    overlap: tuple[float, float] | None
    min_gap: float  # point estimate, NaN without overlap
    max_gap: float
    mean_gap: float
    min_gap_ci: tuple[float, float]
    max_gap_ci: tuple[float, float]
    mean_gap_ci: tuple[float, float]
    n_boot: int  # draws with an overlap (the interval's sample)

    @property
    def verdict(self) -> str:
        """``dominates`` (a over b), ``dominated`` (b over a), ``matches`` or ``no overlap``."""
        if self.overlap is None or not self.n_boot:
            return "no overlap"
        if self.min_gap_ci[0] > 0:
            return "dominates"
        if self.max_gap_ci[1] < 0:
            return "dominated"
        return "matches"


def frontier_points(
    curve: SettingRuns,
    weights: torch.Tensor | None = None,
    seeds: Mapping[float, Sequence[int]] | None = None,
) -> list[tuple[float, float]]:
    """The Pareto frontier ``[(L0, R^2)]`` of a curve: per setting the mean over its seeds
    (``seeds`` picks which, with repeats), every run's sequences weighted by ``weights``."""
    points = []
    for setting, runs in curve.items():
        chosen = [runs[i] for i in seeds[setting]] if seeds is not None else list(runs)
        l0 = sum(r.l0(weights) for r in chosen) / len(chosen)
        r2 = sum(r.r2(weights) for r in chosen) / len(chosen)
        points.append((l0, r2))
    return pareto(points, key=lambda p: p)


def gap_range(
    a: list[tuple[float, float]], b: list[tuple[float, float]], interpolation: str
) -> tuple[tuple[float, float] | None, float, float, float]:
    """(overlap, min gap, max gap, mean gap) of frontier ``a`` over frontier ``b``."""
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if lo > hi:
        return None, math.nan, math.nan, math.nan
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), GRID_POINTS))
    x = np.array(sorted({lo, hi, *(x for x, _ in a + b if lo <= x <= hi), *grid.tolist()}))
    gaps = r2_at(a, x, interpolation) - r2_at(b, x, interpolation)
    mean = float(np.mean(r2_at(a, grid, interpolation) - r2_at(b, grid, interpolation)))
    return (lo, hi), float(gaps.min()), float(gaps.max()), mean


def r2_at(frontier: list[tuple[float, float]], x: np.ndarray, interpolation: str) -> np.ndarray:
    """R^2 of a frontier at the L0 values ``x``; NaN outside its L0 range."""
    if interpolation not in INTERPOLATIONS:
        raise SignSAEError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    xs, ys = [p[0] for p in frontier], [p[1] for p in frontier]
    linear = interpolate(xs, ys, x)  # NaN outside; pchip keeps its values where this is not
    if interpolation == "log_linear" or len(frontier) == 1:
        return linear
    t = np.clip(np.log(x), math.log(xs[0]), math.log(xs[-1]))  # inside, against rounding
    return np.where(np.isnan(linear), np.nan, PchipInterpolator(np.log(xs), ys)(t))


def bootstrap_gap(
    a: SettingRuns,
    b: SettingRuns,
    names: tuple[str, str] = ("a", "b"),
    interpolation: str = "log_linear",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Gap:
    """The gap of curve ``a`` over curve ``b`` with paired bootstrap intervals (module doc)."""
    if interpolation not in INTERPOLATIONS:
        raise SignSAEError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    n_seq = {s.n_tokens.shape[0] for c in (a, b) for runs in c.values() for s in runs}
    if len(n_seq) != 1:
        raise SignSAEError(
            f"Every run must be evaluated on the same sequences; got {sorted(n_seq)}."
        )
    (n,) = n_seq
    overlap, *point = gap_range(frontier_points(a), frontier_points(b), interpolation)
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_boot):
        w = torch.bincount(torch.randint(n, (n,), generator=g), minlength=n)
        span, *extremes = gap_range(
            frontier_points(a, w, _draw_seeds(a, g)),
            frontier_points(b, w, _draw_seeds(b, g)),
            interpolation,
        )
        if span is not None:
            draws.append(extremes)
    tail = 100 * (1 - level) / 2
    cis = (
        [tuple(np.percentile(v, [tail, 100 - tail]).tolist()) for v in zip(*draws, strict=True)]
        if draws
        else [(math.nan, math.nan)] * 3
    )
    return Gap(*names, interpolation, overlap, *point, *cis, len(draws))


def _draw_seeds(curve: SettingRuns, g: torch.Generator) -> dict[float, list[int]]:
    """Per setting, its seeds' indices drawn with replacement."""
    return {s: torch.randint(len(r), (len(r),), generator=g).tolist() for s, r in curve.items()}
