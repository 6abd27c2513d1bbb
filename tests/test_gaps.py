"""Frontier gaps and their paired bootstrap intervals, on hand-made points and on synthetic
frontiers whose true difference is known."""

import math

import pytest
import torch

from analyses.gaps import bootstrap_gap, frontier_points, gap_range
from sign_sae.errors import SignSAEError
from sign_sae.metrics import SequenceStats

SETTINGS = {1.0: (80.0, 0.85), 2.0: (40.0, 0.78), 4.0: (20.0, 0.70), 8.0: (10.0, 0.60), 16.0: (5.0, 0.48)}  # fmt: skip


def run(r2: float, l0: float, difficulty: torch.Tensor, seed_noise: float, g: torch.Generator):
    """One run's per-sequence sums: R^2 about ``r2`` and L0 about ``l0``; sequences share their
    ``difficulty`` across runs (that is what makes the design paired), runs differ by seed."""
    n = difficulty.shape[0]
    tokens = torch.full((n,), 100.0, dtype=torch.float64)
    sum_sq_x = tokens * 4.0  # a per-token variance of 4 around a zero mean
    scale = 1 + seed_noise * torch.randn((), generator=g, dtype=torch.float64)
    sq_error = (1 - r2) * sum_sq_x * difficulty * scale
    return SequenceStats(
        sq_error, sum_sq_x, torch.zeros(n, 3, dtype=torch.float64), l0 * tokens, tokens
    )


def curve(shift: float, difficulty: torch.Tensor, seed_noise: float, g: torch.Generator, seeds=3):
    """Every setting with 1 - R^2 multiplied by (1 - shift): shift > 0 is a better curve."""
    return {
        s: [run(1 - (1 - r2) * (1 - shift), l0, difficulty, seed_noise, g) for _ in range(seeds)]
        for s, (l0, r2) in SETTINGS.items()
    }


def difficulty(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))


def test_gap_range_on_hand_made_frontiers():
    a = [(1.0, 0.5), (10.0, 0.7), (100.0, 0.9)]  # linear in log L0: 0.5 + 0.2 log10(L0)
    b = [(2.0, 0.4), (50.0, 0.8)]
    span, lo, hi, mean = gap_range(a, b, "log_linear")
    assert span == (2.0, 50.0)
    b_at = lambda x: 0.4 + 0.4 * math.log(x / 2) / math.log(25)  # noqa: E731
    a_at = lambda x: 0.5 + 0.2 * math.log10(x)  # noqa: E731
    assert lo == pytest.approx(a_at(50) - b_at(50), abs=1e-9)  # -0.0602: b ahead at the top
    assert hi == pytest.approx(a_at(2) - b_at(2), abs=1e-9)
    # a - b is linear in log L0 on [2, 10] and on [10, 50]: its mean in log L0 is exact
    t = math.log(10 / 2) / math.log(25)
    halves = t * (hi + a_at(10) - b_at(10)) / 2 + (1 - t) * (a_at(10) - b_at(10) + lo) / 2
    assert mean == pytest.approx(halves, abs=2e-3)
    # on points collinear in log L0 the monotone cubic is the same line
    assert gap_range(a, b, "pchip")[1] == pytest.approx(lo, abs=1e-3)
    assert gap_range(a, [(200.0, 0.1), (300.0, 0.2)], "log_linear")[0] is None
    with pytest.raises(SignSAEError, match="interpolation must be one of"):
        gap_range(a, b, "cubic")


def test_frontier_points_average_seeds_and_keep_the_pareto_front():
    g = torch.Generator().manual_seed(0)
    c = curve(0.0, difficulty(16, 0), 0.0, g)
    c[32.0] = [run(0.3, 50.0, difficulty(16, 0), 0.0, g)]  # dominated: dropped from the front
    pts = frontier_points(c)
    assert [round(p[0]) for p in pts] == [5, 10, 20, 40, 80]
    assert pts[-1][1] == pytest.approx(1 - 0.15 * difficulty(16, 0).mean().item(), rel=1e-9)


def test_a_clearly_better_curve_dominates_and_the_interval_covers_the_true_gap():
    g = torch.Generator().manual_seed(1)
    d = difficulty(64, 1)
    gap = bootstrap_gap(curve(0.10, d, 0.02, g), curve(0.0, d, 0.02, g), n_boot=300)
    assert gap.verdict == "dominates" and gap.min_gap_ci[0] > 0
    # the true curves (no seed noise, the population mean difficulty): 1 - R^2 = 0.9 (1 - R^2_b)
    # everywhere, so the smallest gap is 0.1 (1 - R^2_b) at the best setting, times E[d] = e^0.125
    true_min = 0.10 * 0.15 * math.exp(0.125)
    assert gap.min_gap_ci[0] < true_min < gap.min_gap_ci[1]
    assert gap.min_gap_ci[0] < gap.min_gap < gap.min_gap_ci[1]
    assert gap.min_gap_ci[0] < gap.mean_gap_ci[0] and gap.mean_gap_ci[0] > true_min


@pytest.mark.parametrize("interpolation", ["log_linear", "pchip"])
def test_the_same_recipe_matches_and_the_interval_contains_zero(interpolation):
    g = torch.Generator().manual_seed(2)
    d = difficulty(64, 2)
    gap = bootstrap_gap(
        curve(0.0, d, 0.03, g), curve(0.0, d, 0.03, g), interpolation=interpolation, n_boot=300
    )
    assert gap.verdict == "matches"
    assert gap.min_gap_ci[0] < 0 < gap.max_gap_ci[1]
    assert gap.mean_gap_ci[0] < 0 < gap.mean_gap_ci[1]  # the same recipe: no mean gap either


def test_a_worse_curve_is_dominated():
    g = torch.Generator().manual_seed(3)
    d = difficulty(64, 3)
    gap = bootstrap_gap(curve(-0.10, d, 0.02, g), curve(0.0, d, 0.02, g), n_boot=200)
    assert gap.verdict == "dominated" and gap.max_gap_ci[1] < 0


def test_seed_spread_widens_the_interval():
    """A tiny true gap with large seed noise is not called: the seeds' spread enters the interval."""
    d = difficulty(64, 4)
    # paired: the sequences' shared difficulty cancels, so a 0.003 gap is called when seeds agree
    quiet = bootstrap_gap(curve(0.02, d, 0.0, torch.Generator().manual_seed(4)),
                          curve(0.0, d, 0.0, torch.Generator().manual_seed(5)), n_boot=200)  # fmt: skip
    noisy = bootstrap_gap(curve(0.02, d, 0.08, torch.Generator().manual_seed(4)),
                          curve(0.0, d, 0.08, torch.Generator().manual_seed(5)), n_boot=200)  # fmt: skip
    width = lambda gap: gap.min_gap_ci[1] - gap.min_gap_ci[0]  # noqa: E731
    assert quiet.verdict == "dominates" and noisy.verdict == "matches"
    assert width(noisy) > 3 * width(quiet)


def test_runs_on_different_sequences_are_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(SignSAEError, match="same sequences"):
        bootstrap_gap(curve(0.0, difficulty(8, 0), 0.0, g), curve(0.0, difficulty(9, 0), 0.0, g))
