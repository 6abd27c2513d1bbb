"""Frontier maths on hand-made curves whose answers are known."""

import math

import numpy as np
import pytest

from analyses import frontier, tables
from analyses.frontier import Curve, CurvePoint


def curve(label: str, pts: list[tuple[float, float]], dead: float = 0.0, d_sae: int = 100) -> Curve:
    return Curve(
        label,
        [CurvePoint(i, l0, r2, dead, r2, r2, 1, l0, l0) for i, (l0, r2) in enumerate(pts)],
        d_sae,
    )


def row(label: str, sparsity: float, seed: int, l0: float, r2: float, dead: float, **kw) -> dict:
    return {
        "model": "m",
        "hook": "h",
        "label": label,
        "arch": "sa_gsae",
        "sparsity": sparsity,
        "seed": seed,
        "l0": l0,
        "r2": r2,
        "dead_fraction": dead,
        "d_in": 8,
        "d_sae": 100,
        "n_params_train": 1000,
        "ce_loss_recovered": 0.9,
        **kw,
    }


def test_interpolation_is_linear_in_log_l0_and_undefined_outside():
    xs, ys = [10.0, 1000.0], [0.2, 0.6]
    assert frontier.interpolate(xs, ys, 100.0) == pytest.approx(0.4)  # log-midpoint
    assert frontier.interpolate(xs, ys, 10.0) == pytest.approx(0.2)
    assert frontier.interpolate(xs, ys, 1000.0) == pytest.approx(0.6)
    assert math.isnan(frontier.interpolate(xs, ys, 5.0))
    assert math.isnan(frontier.interpolate(xs, ys, 2000.0))
    assert math.isnan(frontier.interpolate(xs, ys, 0.0))
    # arrays alike; extend=True extends the end segments (the only other rule)
    at = np.array([5.0, 100.0, 2000.0])
    got = frontier.interpolate(xs, ys, at)
    assert math.isnan(got[0]) and got[1] == pytest.approx(0.4) and math.isnan(got[2])
    wide = frontier.interpolate(xs, ys, at, extend=True)
    assert wide[0] == pytest.approx(0.2 - 0.2 * math.log10(2)) and wide[2] > 0.6


def test_frontier_keeps_only_pareto_points():
    c = curve("a", [(10, 0.5), (20, 0.4), (40, 0.7), (80, 0.7)])
    assert [(p.l0, p.r2) for p in c.frontier] == [(10, 0.5), (40, 0.7)]


def test_pareto_keeps_the_best_of_equal_l0_whatever_the_items():
    rows = [
        {"l0": 10, "r2": 0.3},
        {"l0": 10, "r2": 0.6},
        {"l0": 5, "r2": 0.6},
        {"l0": 20, "r2": 0.9},
    ]
    front = frontier.pareto(rows, key=lambda r: (r["l0"], r["r2"]))
    assert front == [{"l0": 5, "r2": 0.6}, {"l0": 20, "r2": 0.9}]
    assert frontier.pareto([(10, 0.3), (10, 0.6)], key=lambda p: p) == [(10, 0.6)]


def test_strict_dominance_over_the_full_overlap():
    b = curve("b", [(10, 0.5), (100, 0.7), (1000, 0.9)])
    a = curve("a", [(10, 0.55), (100, 0.75), (1000, 0.95)])
    k = frontier.compare_curves(a, b)
    assert k.overlap == (10, 1000)
    assert k.dominates is True
    assert k.min_gap == pytest.approx(0.05)
    assert k.max_gap == pytest.approx(0.05)


def test_partial_overlap_uses_only_the_common_range():
    # a is far below b outside [50, 100] but above it inside: dominance holds on the overlap.
    a = curve("a", [(10, 0.0), (100, 0.9)])
    b = curve("b", [(50, 0.6), (500, 0.99)])
    k = frontier.compare_curves(a, b)
    assert k.overlap == (50, 100)
    # at L0 = 50: a = 0.9 log(5) / log(10), b = 0.6; at 100: a = 0.9, b = 0.6 + 0.39 log(2) / log(10)
    gap50 = 0.9 * math.log(5) / math.log(10) - 0.6
    gap100 = 0.9 - (0.6 + 0.39 * math.log(2) / math.log(10))
    assert k.min_gap == pytest.approx(min(gap50, gap100))
    assert k.max_gap == pytest.approx(max(gap50, gap100))
    assert k.dominates is True


def test_crossing_curves_do_not_dominate_and_report_the_worst_gap():
    a = curve("a", [(10, 0.6), (1000, 0.8)])
    b = curve("b", [(10, 0.5), (1000, 0.9)])
    k = frontier.compare_curves(a, b)
    assert k.dominates is False
    assert k.min_gap == pytest.approx(-0.1)  # at L0 = 1000
    assert k.max_gap == pytest.approx(0.1)  # at L0 = 10


def test_a_dip_between_grid_points_is_caught_at_the_breakpoint():
    # b has one breakpoint where it rises above a; only that exact L0 shows it.
    a = curve("a", [(10, 0.5), (1000, 0.7)])
    b = curve("b", [(10, 0.4), (123.4, 0.7), (1000, 0.6)])
    k = frontier.compare_curves(a, b)
    assert 123.4 in frontier.check_points(a, b, k.overlap)
    assert k.dominates is False
    assert k.min_gap == pytest.approx(frontier.interpolate([10, 1000], [0.5, 0.7], 123.4) - 0.7)


def test_touching_is_not_strict_dominance():
    a = curve("a", [(10, 0.5), (100, 0.9)])
    b = curve("b", [(10, 0.5), (100, 0.8)])
    k = frontier.compare_curves(a, b)
    assert k.min_gap == pytest.approx(0.0)
    assert k.dominates is False


def test_no_overlap_gives_no_verdict():
    a = curve("a", [(1, 0.3), (10, 0.5)])
    b = curve("b", [(100, 0.7), (1000, 0.9)])
    k = frontier.compare_curves(a, b)
    assert k.overlap is None and k.dominates is None and k.min_gap is None


def test_single_point_curves_compare_at_their_common_l0():
    k = frontier.compare_curves(curve("a", [(10, 0.6)]), curve("b", [(5, 0.4), (20, 0.8)]))
    assert k.overlap == (10, 10)
    assert k.min_gap == pytest.approx(0.0)  # b at 10 is the log-midpoint: 0.6


def test_dead_ratio_floors_zero_at_half_a_latent_of_the_wider_sae():
    a = curve("a", [(10, 0.6), (100, 0.8)], dead=0.0, d_sae=100)
    b = curve("b", [(10, 0.5), (100, 0.7)], dead=0.2, d_sae=200)
    k = frontier.compare_curves(a, b)
    assert k.dead_floor == pytest.approx(0.5 / 200)
    assert k.dead_ratio_mid == pytest.approx(0.2 / (0.5 / 200))
    assert frontier.compare_curves(a, b, dead_floor=1e-4).dead_ratio_mid == pytest.approx(
        0.2 / 1e-4
    )


def test_geomean_dead_applies_the_floor():
    rows = [{"dead_fraction": 0.0}, {"dead_fraction": 0.04}]
    assert frontier.geomean_dead(rows, 0.01) == pytest.approx(math.sqrt(0.01 * 0.04))


def test_curves_average_seeds_and_keep_their_spread():
    rows = [row("a", 1.0, s, 10 + s, 0.5 + 0.1 * s, 0.0) for s in range(3)]
    (c,) = frontier.curves(rows).values()
    (p,) = c.points
    assert (p.n_seeds, p.l0, p.r2) == (3, pytest.approx(11), pytest.approx(0.6))
    assert (p.r2_min, p.r2_max) == (pytest.approx(0.5), pytest.approx(0.7))
    assert (p.l0_min, p.l0_max) == (10, 12)


def test_analyse_cells_ablations_collapse_and_sweep_ratio():
    rows = [
        row("sa_gsae_H", 1.0, 0, 10, 0.6, 0.0),
        row("sa_gsae_H", 3.0, 0, 100, 0.8, 0.01),
        row("gated_2H", 1.0, 0, 10, 0.5, 0.1),
        row("gated_2H", 3.0, 0, 100, 0.7, 0.04),
        row("noaux", 1.0, 0, 0.0, 0.0, 1.0, ablation_of="sa_gsae_H", ce_loss_recovered=0.2),
        row("untied", 1.0, 0, 11, 0.61, 0.0, ablation_of="sa_gsae_H"),
    ]
    result = frontier.analyse(rows, reference="sa_gsae_H", dead_floor=0.005)
    (cell,) = result["cells"]
    assert set(cell.curves) == {"sa_gsae_H", "gated_2H"}  # ablations are not curves
    (k,) = cell.comparisons
    assert k.dominates is True and k.min_gap == pytest.approx(0.1)
    expected = math.sqrt(0.1 * 0.04) / math.sqrt(0.005 * 0.01)
    assert cell.dead_ratio_sweep["gated_2H"] == pytest.approx(expected)
    assert result["dead_ratio_geomean"]["gated_2H"] == pytest.approx(expected)
    ab = {a["label"]: a for a in result["ablations"]}
    assert ab["noaux"]["collapsed"] and ab["noaux"]["ref_ce_loss_recovered"] == 0.9
    assert ab["untied"]["abs_delta_r2"] == pytest.approx(0.01)
    assert [c["label"] for c in result["collapsed"]] == ["noaux"]
    text = tables.format_markdown(result)
    assert "| m h | gated_2H | 10.0-100.0 | yes | +0.100 |" in text
    assert frontier.to_json(result)["cells"][0]["comparisons"][0]["dominates"] is True


def test_collapse_thresholds():
    assert frontier.collapsed({"r2": 0.05, "dead_fraction": 0.0})
    assert frontier.collapsed({"r2": 0.5, "dead_fraction": 0.95})
    assert not frontier.collapsed({"r2": 0.5, "dead_fraction": 0.5})


def test_parameters_relative_to_the_reference_and_polarity_of_signed_runs():
    rows = [
        row("sa_gsae_H", 1.0, 0, 10, 0.6, 0.0, n_params_train=667_008, top1_share=0.2),
        row("gated_2H", 1.0, 0, 10, 0.5, 0.1, n_params_train=1_331_136, top1_share=None),
    ]
    params = {p["label"]: p for p in frontier.parameters(rows, "sa_gsae_H")}
    assert params["gated_2H"]["vs_reference"] == pytest.approx(1_331_136 / 667_008)
    assert params["sa_gsae_H"]["vs_reference"] == 1.0
    assert [p["label"] for p in frontier.polarity(rows)] == ["sa_gsae_H"]
